"""ResNet-12 backbone of MetaOptNet, with a functional DropBlock."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metalight.models._layers import BatchNormMode, check_batch_norm_mode, norm_2d

__all__ = ["DropBlock", "ResNet12", "ResNet12Block", "drop_block"]


def drop_block(
    x: torch.Tensor, drop_rate: float, block_size: int, training: bool = True
) -> torch.Tensor:
    """DropBlock regularisation: zero random square blocks of each feature map.

    Block centres are sampled so that every block lies fully inside the feature map, with a
    rate ``gamma`` chosen so that about ``drop_rate`` of the activations are dropped; the
    kept activations are rescaled by ``numel / kept`` as in MetaOptNet. The block side is
    ``min(block_size, H, W)``. Purely functional: ``x`` is never modified and the random mask
    carries no gradient. Unlike MetaOptNet, ``drop_rate`` is used as is (no linear warm-up
    schedule driven by a step counter), so the module holds no mutable state.

    Reference: Ghiasi et al., 2018, "DropBlock: A regularization method for convolutional
    networks", NeurIPS, https://arxiv.org/abs/1810.12890.

    Args:
        x: Feature maps of shape ``[..., H, W]`` (typically ``[B, C, H, W]``).
        drop_rate: Target fraction of dropped activations, in ``[0, 1)``.
        block_size: Side of the dropped square blocks.
        training: If ``False`` (or ``drop_rate == 0``), ``x`` is returned unchanged.

    Returns:
        A tensor of the same shape, dtype and device as ``x``.

    Raises:
        ValueError: If ``drop_rate`` is not in ``[0, 1)`` or ``block_size < 1``.

    Example:
        >>> import torch
        >>> from metalight.models.resnet12 import drop_block
        >>> x = torch.ones(2, 3, 10, 10)
        >>> drop_block(x, drop_rate=0.1, block_size=3).shape
        torch.Size([2, 3, 10, 10])
        >>> torch.equal(drop_block(x, 0.1, 3, training=False), x)
        True
    """
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}.")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    if not training or drop_rate == 0.0:
        return x
    height, width = x.shape[-2], x.shape[-1]
    size = min(block_size, height, width)
    valid_h, valid_w = height - size + 1, width - size + 1
    gamma = min(1.0, drop_rate / size**2 * (height * width) / (valid_h * valid_w))
    with torch.no_grad():
        seed_shape = (*x.shape[:-2], valid_h, valid_w)
        seeds = (torch.rand(seed_shape, device=x.device) < gamma).to(x.dtype)
        # Padding by size - 1 and a stride-1 max-pool of side `size` grows every seed at
        # (i, j) into the block [i, i + size) x [j, j + size) of the original H x W map.
        padded = F.pad(seeds, (size - 1, size - 1, size - 1, size - 1))
        dropped = F.max_pool2d(padded, kernel_size=size, stride=1)
        keep = 1.0 - dropped
        scale = keep.numel() / keep.sum().clamp_min(1.0)
        mask = keep * scale
    return x * mask


class DropBlock(nn.Module):
    """Module wrapper of :func:`drop_block`, active only in training mode.

    Args:
        drop_rate: Target fraction of dropped activations, in ``[0, 1)``.
        block_size: Side of the dropped square blocks.

    Example:
        >>> import torch
        >>> from metalight.models.resnet12 import DropBlock
        >>> DropBlock(0.1, 5)(torch.randn(2, 8, 10, 10)).shape
        torch.Size([2, 8, 10, 10])
    """

    def __init__(self, drop_rate: float, block_size: int = 5) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}.")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}.")
        self.drop_rate = float(drop_rate)
        self.block_size = int(block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply :func:`drop_block` when training, the identity otherwise."""
        return drop_block(x, self.drop_rate, self.block_size, self.training)

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, block_size={self.block_size}"


class ResNet12Block(nn.Module):
    """One MetaOptNet residual block.

    Three 3x3 conv-BN layers (LeakyReLU(0.1) after the first two), a 1x1 conv-BN shortcut,
    the sum followed by LeakyReLU(0.1), 2x2 max-pooling, then optional regularisation:
    dropout or DropBlock. Convolutions have no bias unless ``batch_norm="none"``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels of every convolution in the block.
        batch_norm: ``"running"``, ``"batch"`` or ``"none"`` (see :class:`ResNet12`).
        bn_momentum: Momentum of the running statistics (only used by ``"running"``).
        drop_rate: Dropout / DropBlock rate; 0 disables regularisation.
        use_drop_block: Use DropBlock instead of plain dropout when ``drop_rate > 0``.
        dropblock_size: Side of the DropBlock blocks.

    Example:
        >>> import torch
        >>> from metalight.models.resnet12 import ResNet12Block
        >>> ResNet12Block(3, 8)(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 8, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        batch_norm: BatchNormMode = "running",
        bn_momentum: float = 0.1,
        drop_rate: float = 0.0,
        use_drop_block: bool = False,
        dropblock_size: int = 5,
    ) -> None:
        super().__init__()
        check_batch_norm_mode(batch_norm)
        bias = batch_norm == "none"

        def conv(n_in: int, kernel_size: int) -> nn.Conv2d:
            return nn.Conv2d(n_in, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)

        self.conv1 = conv(in_channels, 3)
        self.bn1 = norm_2d(batch_norm, out_channels, bn_momentum)
        self.conv2 = conv(out_channels, 3)
        self.bn2 = norm_2d(batch_norm, out_channels, bn_momentum)
        self.conv3 = conv(out_channels, 3)
        self.bn3 = norm_2d(batch_norm, out_channels, bn_momentum)
        self.shortcut = nn.Sequential(
            conv(in_channels, 1), norm_2d(batch_norm, out_channels, bn_momentum)
        )
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)
        self.dropout: nn.Module
        if drop_rate == 0.0:
            self.dropout = nn.Identity()
        elif use_drop_block:
            self.dropout = DropBlock(drop_rate, dropblock_size)
        else:
            self.dropout = nn.Dropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, in_channels, H, W]`` to ``[B, out_channels, H // 2, W // 2]``."""
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.act(out + self.shortcut(x))
        return self.dropout(self.pool(out))


class ResNet12(nn.Module):
    """ResNet-12 of MetaOptNet, split into a ``features`` body and a linear ``head``.

    ``features`` is four :class:`ResNet12Block` s with ``channels`` outputs (each halving the
    spatial size), then global average pooling and a flatten, giving ``[B, channels[-1]]``;
    with ``avg_pool=False`` the last feature map is flattened instead, giving
    ``channels[-1] * s * s`` features with ``s = image_size`` halved (rounding down) four
    times (84 -> 5). ``head`` is ``Linear(feature_dim, out_features)`` and ``forward(x)`` is
    ``head(features(x))``. With ``drop_rate > 0`` the first two blocks use dropout and the
    last two DropBlock, as in MetaOptNet (without its warm-up schedule, see
    :func:`drop_block`). Convolutions use Kaiming-normal initialisation (fan-out,
    LeakyReLU), as in MetaOptNet.

    Reference: Lee et al., 2019, "Meta-Learning with Differentiable Convex Optimization",
    CVPR, https://arxiv.org/abs/1904.03758.

    Args:
        in_channels: Channels of the input images.
        out_features: Output size of the head (the number of ways).
        channels: Output channels of the four residual blocks.
        drop_rate: Dropout / DropBlock rate in ``[0, 1)`` (MetaOptNet used 0.1 on
            mini-ImageNet); 0 disables them.
        dropblock_size: Side of the DropBlock blocks (clipped to the feature-map size).
        avg_pool: Global average pooling before the head; if ``False``, flatten instead.
        image_size: Side of the square inputs; only used when ``avg_pool=False``.
        batch_norm: ``"running"`` (default: the usual BatchNorm, as in MetaOptNet),
            ``"batch"`` (batch statistics in train and eval mode, no running buffers) or
            ``"none"``.
        bn_momentum: Momentum of the running statistics (only used by ``"running"``).

    Raises:
        ValueError: If ``channels`` does not have four entries, for an unknown
            ``batch_norm``, an invalid ``drop_rate``, or a too small ``image_size``.

    Example:
        >>> import torch
        >>> from metalight.models import ResNet12
        >>> model = ResNet12(in_channels=1, out_features=5, channels=(8, 16, 32, 64))
        >>> model(torch.randn(4, 1, 28, 28)).shape
        torch.Size([4, 5])
        >>> model.features(torch.randn(4, 1, 28, 28)).shape
        torch.Size([4, 64])
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_features: int = 5,
        channels: Sequence[int] = (64, 160, 320, 640),
        drop_rate: float = 0.0,
        dropblock_size: int = 5,
        avg_pool: bool = True,
        image_size: int = 84,
        batch_norm: BatchNormMode = "running",
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        widths = [int(c) for c in channels]
        if len(widths) != 4:
            raise ValueError(f"channels must have 4 entries, got {tuple(channels)}.")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}.")
        check_batch_norm_mode(batch_norm)
        side = int(image_size) // 2**4
        if not avg_pool and side < 1:
            raise ValueError(
                f"image_size={image_size} is too small for ResNet12 with avg_pool=False "
                "(needs image_size >= 16)."
            )
        layers: list[nn.Module] = []
        n_in = int(in_channels)
        for index, width in enumerate(widths):
            layers.append(
                ResNet12Block(
                    n_in,
                    width,
                    batch_norm=batch_norm,
                    bn_momentum=bn_momentum,
                    drop_rate=drop_rate,
                    use_drop_block=index >= 2,
                    dropblock_size=dropblock_size,
                )
            )
            n_in = width
        if avg_pool:
            layers.append(nn.AdaptiveAvgPool2d(1))
            self.feature_dim: int = widths[-1]
        else:
            self.feature_dim = widths[-1] * side * side
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(self.feature_dim, int(out_features))
        for module in self.features.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``[B, in_channels, H, W]`` to ``[B, out_features]``."""
        return self.head(self.features(x))
