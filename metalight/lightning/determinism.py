"""Bitwise-reproducible runs: deterministic settings, and random states kept in checkpoints.

Two runs with the same seed and :func:`enable_determinism` compute the same numbers on the
same machine (CPU: bitwise; GPU: bitwise for the same card, driver and library versions).
metalight's task streams do not use the global random generators (every task has its own
generator), so a meta-learning run without random layers resumes exactly from a checkpoint
as it is. Random layers (dropout, ResNet-12's DropBlock) draw from the global generators,
whose state Lightning does not checkpoint: add :class:`RNGStateCallback` so that a resumed
run draws the same random numbers as an uninterrupted one.
"""

from __future__ import annotations

import os
import random
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["RNGStateCallback", "enable_determinism", "get_rng_states", "set_rng_states"]


def enable_determinism(seed: int, *, warn_only: bool = False) -> int:
    """Seeds every generator and selects deterministic kernels.

    Pair it with ``lightning.Trainer(deterministic=True)``.

    Seeds Python's ``random``, NumPy and torch (all devices) through
    :func:`lightning.seed_everything` (``workers=True``, so DataLoader workers are seeded
    too), calls ``torch.use_deterministic_algorithms(True)``, turns off cuDNN's benchmark
    autotuner and sets ``CUBLAS_WORKSPACE_CONFIG`` (needed by deterministic cuBLAS) unless
    it is already set. Call it before building the model.

    Args:
        seed: The seed.
        warn_only: Warn instead of raising when an operation has no deterministic kernel.

    Returns:
        The seed.

    Example (it changes process-wide settings, so it is not run as a doctest):
        >>> import lightning as L
        >>> enable_determinism(0)  # doctest: +SKIP
        >>> trainer = L.Trainer(deterministic=True, accelerator="cpu")  # doctest: +SKIP
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    pl.seed_everything(seed, workers=True, verbose=False)
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return seed


def get_rng_states() -> dict[str, Any]:
    """The states of Python's, NumPy's (if installed) and torch's (CPU and CUDA) generators.

    Only tensors and plain Python values, so a checkpoint holding them loads with
    ``torch.load(weights_only=True)``.
    """
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        return states
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restores generator states from :func:`get_rng_states` (missing entries are left alone)."""
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = states.get("torch.cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in states:
        import numpy as np

        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


class RNGStateCallback(pl.Callback):
    """Keeps the global random generators' states in checkpoints, for exact resumes.

    Lightning checkpoints the model, optimizers, schedulers, loops and the DataModule's
    ``state_dict`` but not the random generators, so a run resumed from a checkpoint
    draws different dropout masks than the uninterrupted run would have. This callback
    stores every process's states when a checkpoint is written and restores them just
    before the first training batch after resuming (the same point in the computation as
    where they were saved, the end of the previous batch). Data loading must not draw from
    the global generators (metalight's task streams do not).

    In multi-process runs each process's states are gathered into the checkpoint and each
    process gets its own back; resuming with a different number of processes keeps the
    freshly seeded states and warns.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[RNGStateCallback()], logger=False)  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "RNGStateCallback"

    def state_dict(self) -> dict[str, Any]:
        states = get_rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)
            return {"per_rank": gathered}
        return {"per_rank": [states]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        per_rank = state_dict["per_rank"]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = 0, 1
        if len(per_rank) != world:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"the checkpoint holds random states of {len(per_rank)} processes but this run "
                f"has {world}: random layers will not draw the numbers of the original run"
            )
            self._pending = None
            return
        self._pending = per_rank[rank]

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None
