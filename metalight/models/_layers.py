"""Small building blocks shared by the backbones in :mod:`metalight.models`."""

from typing import Literal, get_args

from torch import nn

__all__ = ["BatchNormMode", "check_batch_norm_mode", "norm_2d"]

BatchNormMode = Literal["batch", "running", "none"]
"""How a backbone normalises its convolutional activations.

* ``"batch"``: BatchNorm that always uses the statistics of the current batch, in train
  and eval mode alike, and keeps no running buffers (``track_running_stats=False``). This is
  the transductive BatchNorm of MAML (Finn et al., 2017).
* ``"running"``: the usual BatchNorm, with running statistics used in eval mode.
* ``"none"``: no normalisation.
"""

_BATCH_NORM_MODES: tuple[str, ...] = get_args(BatchNormMode)


def check_batch_norm_mode(mode: str) -> None:
    """Raise a ``ValueError`` unless ``mode`` is one of ``"batch"``, ``"running"``, ``"none"``.

    Args:
        mode: The requested BatchNorm mode.

    Raises:
        ValueError: If ``mode`` is not a known mode.
    """
    if mode not in _BATCH_NORM_MODES:
        known = ", ".join(repr(m) for m in _BATCH_NORM_MODES)
        raise ValueError(f"Unknown batch_norm mode {mode!r}; expected one of {known}.")


def norm_2d(mode: str, channels: int, momentum: float = 0.1) -> nn.Module:
    """Build the 2-D normalisation layer for ``mode``.

    Args:
        mode: ``"batch"``, ``"running"`` or ``"none"`` (see :data:`BatchNormMode`).
        channels: Number of channels to normalise.
        momentum: BatchNorm momentum for the running statistics (only used by ``"running"``).

    Returns:
        A ``BatchNorm2d`` (with affine parameters) or an ``Identity``.

    Raises:
        ValueError: If ``mode`` is not a known mode.
    """
    check_batch_norm_mode(mode)
    if mode == "none":
        return nn.Identity()
    return nn.BatchNorm2d(channels, momentum=momentum, track_running_stats=mode == "running")
