"""Four-block convolutional backbone of MAML for Omniglot and mini-ImageNet."""

from typing import Literal

import torch
from torch import nn

from metalight.models._layers import BatchNormMode, check_batch_norm_mode, norm_2d

__all__ = ["Conv4", "conv4_output_size"]

_NUM_BLOCKS = 4


def conv4_output_size(image_size: int, pool: str = "max") -> int:
    """Spatial side length of the feature map after the four :class:`Conv4` blocks.

    Each block halves the side: 2x2 max-pooling rounds down (``floor(n / 2)``), a stride-2
    3x3 convolution with padding 1 rounds up (``ceil(n / 2)``).

    Args:
        image_size: Side length of the (square) input image.
        pool: ``"max"`` or ``"stride"``.

    Returns:
        The side length of the last feature map (28 -> 1 and 84 -> 5 for ``"max"``,
        28 -> 2 for ``"stride"``).

    Raises:
        ValueError: If ``pool`` is unknown or the feature map would be empty.

    Example:
        >>> conv4_output_size(84)
        5
    """
    if pool not in ("max", "stride"):
        raise ValueError(f"Unknown pool {pool!r}; expected 'max' or 'stride'.")
    size = int(image_size)
    for _ in range(_NUM_BLOCKS):
        size = size // 2 if pool == "max" else (size + 1) // 2
    if size < 1:
        raise ValueError(
            f"image_size={image_size} is too small for Conv4 with pool={pool!r}: "
            "the feature map would be empty (max-pooling needs image_size >= 16)."
        )
    return size


class Conv4(nn.Module):
    """The four-block CNN of MAML, split into a ``features`` body and a linear ``head``.

    Each block is a 3x3 convolution with ``hidden`` filters (padding 1, with bias),
    BatchNorm, ReLU and 2x2 max-pooling; with ``pool="stride"`` the convolution has stride
    2 and there is no pooling (as MAML did for Omniglot). ``features`` ends with a flatten,
    so it returns ``[B, feature_dim]`` with ``feature_dim = hidden * s * s`` where ``s`` is
    :func:`conv4_output_size` of ``image_size`` (28 -> 64 features for ``hidden=64`` and
    max-pooling; 84 -> 32 * 5 * 5 = 800 for mini-ImageNet's ``hidden=32``). ``head`` is a
    ``Linear(feature_dim, out_features)`` and ``forward(x)`` is ``head(features(x))``.

    Reference: Finn et al., 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks", ICML, https://arxiv.org/abs/1703.03400 (architecture from Vinyals et al.,
    2016, "Matching Networks for One Shot Learning").

    Args:
        in_channels: Channels of the input images (1 for Omniglot, 3 for mini-ImageNet).
        out_features: Output size of the head (the number of ways).
        hidden: Filters per convolution (64 for Omniglot, 32 for mini-ImageNet).
        image_size: Side length of the square input images; fixes ``feature_dim``.
        pool: ``"max"`` for 2x2 max-pooling, ``"stride"`` for stride-2 convolutions.
        batch_norm: ``"batch"`` (default) normalises with the current batch's statistics in
            train and eval mode and has no running buffers (MAML's transductive BatchNorm);
            ``"running"`` is the usual BatchNorm with running statistics; ``"none"`` drops
            the normalisation.
        bn_momentum: Momentum of the running statistics (only used by ``"running"``).

    Raises:
        ValueError: For an unknown ``pool`` or ``batch_norm`` or a too small ``image_size``.

    Example:
        >>> import torch
        >>> from metalight.models import Conv4
        >>> model = Conv4(in_channels=1, out_features=5, hidden=64, image_size=28)
        >>> model(torch.randn(25, 1, 28, 28)).shape
        torch.Size([25, 5])
        >>> model.features(torch.randn(25, 1, 28, 28)).shape
        torch.Size([25, 64])
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_features: int = 5,
        hidden: int = 64,
        image_size: int = 28,
        pool: Literal["max", "stride"] = "max",
        batch_norm: BatchNormMode = "batch",
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        check_batch_norm_mode(batch_norm)
        side = conv4_output_size(image_size, pool)
        stride = 2 if pool == "stride" else 1
        layers: list[nn.Module] = []
        channels = int(in_channels)
        for _ in range(_NUM_BLOCKS):
            layers += [
                nn.Conv2d(channels, int(hidden), kernel_size=3, stride=stride, padding=1),
                norm_2d(batch_norm, int(hidden), bn_momentum),
                nn.ReLU(),
            ]
            if pool == "max":
                layers.append(nn.MaxPool2d(2))
            channels = int(hidden)
        layers.append(nn.Flatten())
        self.feature_dim: int = int(hidden) * side * side
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(self.feature_dim, int(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``[B, in_channels, image_size, image_size]`` to ``[B, out_features]``."""
        return self.head(self.features(x))
