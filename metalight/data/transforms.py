"""Public image transforms: what a training image went through, applied to any new image.

The image datasets (:class:`~metalight.data.Omniglot`, :class:`~metalight.data.ImageFolder`,
mini-ImageNet) decode every file once: grey or RGB, resize (antialiased Lanczos), invert
for Omniglot, stored as uint8 and scaled to float in ``[0, 1]`` when fetched. The
transforms here run exactly those steps through the same code, so that an image read for
prediction equals, bit for bit, the tensor the model saw in training.

Example:
    >>> from PIL import Image
    >>> t = OmniglotTransform(image_size=28)
    >>> t(Image.new("L", (105, 105), 255)).shape  # a white page: all background
    torch.Size([1, 28, 28])
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from metalight.data._images import decode_image, normalize_size, pil_to_tensor

__all__ = ["ImageSource", "ImageTransform", "OmniglotTransform", "to_float"]

ImageSource = str | os.PathLike[str] | bytes | Image.Image
"""What a transform reads: a file path, the encoded bytes of a file, or a PIL image."""


def to_float(images: Tensor) -> Tensor:
    """Scales stored uint8 images to float32 in ``[0, 1]`` as the datasets fetch them.

    Example:
        >>> to_float(torch.tensor([0, 51, 255], dtype=torch.uint8)).tolist()
        [0.0, 0.20000000298023224, 1.0]
    """
    if images.dtype == torch.uint8:
        # The very expression FewShotDataset.fetch uses, so the values agree exactly.
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


class ImageTransform:
    """Decode, convert to grey or RGB, resize, optionally invert, and scale to ``[0, 1]``.

    Calling the transform on an image returns a float32 ``[channels, H, W]`` tensor;
    :meth:`stack` reads several into ``[N, channels, H, W]``.

    Args:
        image_size: Resize to ``size`` x ``size`` or ``(height, width)``; ``None`` keeps
            the stored size.
        channels: 1 (grayscale) or 3 (RGB).
        invert: Return ``1 - value`` (dark strokes on white become 1, as for Omniglot).

    Raises:
        ValueError: On an invalid ``image_size`` or ``channels``.

    Example:
        >>> from PIL import Image
        >>> t = ImageTransform(image_size=(8, 12), channels=3)
        >>> t(Image.new("RGB", (30, 20), (255, 0, 0)))[:, 0, 0].tolist()
        [1.0, 0.0, 0.0]
        >>> ImageTransform.from_config(t.config()) == t
        True
    """

    def __init__(
        self,
        image_size: int | Sequence[int] | None = 84,
        channels: int = 3,
        invert: bool = False,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}.")
        self.size = normalize_size(image_size)
        self.channels = int(channels)
        self.invert = bool(invert)

    def decode(self, image: ImageSource, name: str | None = None) -> Tensor:
        """The uint8 ``[channels, H, W]`` tensor a dataset stores for ``image``.

        Args:
            image: A file path, the bytes of an encoded file, or a PIL image.
            name: What to call the image in error messages (default: its path).

        Raises:
            FileNotFoundError: If a path does not exist.
            ValueError: If the file cannot be decoded (the message names it).
        """
        if isinstance(image, Image.Image):
            return pil_to_tensor(image, self.size, self.channels, self.invert)
        if isinstance(image, bytes):
            return decode_image(image, name or "<bytes>", self.size, self.channels, self.invert)
        path = Path(image).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist; check the path.")
        return decode_image(path.read_bytes(), name or str(path), *self._settings())

    def __call__(self, image: ImageSource) -> Tensor:
        """The float32 ``[channels, H, W]`` tensor in ``[0, 1]`` the model sees for ``image``."""
        return to_float(self.decode(image))

    def stack(self, images: Sequence[ImageSource]) -> Tensor:
        """Reads images into one float32 ``[N, channels, H, W]`` tensor.

        Raises:
            ValueError: If ``images`` is empty, or (with ``image_size=None``) their sizes
                differ; the message names the files.
        """
        if len(images) == 0:
            raise ValueError("no images to read; pass at least one image.")
        decoded = []
        first: tuple[str, tuple[int, ...]] | None = None
        for index, image in enumerate(images):
            x = self.decode(image)
            name = _describe(image, index)
            if first is None:
                first = (name, tuple(x.shape))
            elif tuple(x.shape) != first[1]:
                raise ValueError(
                    f"image {name} has shape {tuple(x.shape)} but {first[0]} has {first[1]}; "
                    "resize every image to one size (pass an image_size)."
                )
            decoded.append(x)
        return to_float(torch.stack(decoded))

    def _settings(self) -> tuple[tuple[int, int] | None, int, bool]:
        return self.size, self.channels, self.invert

    def config(self) -> dict[str, Any]:
        """The settings as plain values (``image_size``, ``channels``, ``invert``)."""
        size = None if self.size is None else list(self.size)
        return {"image_size": size, "channels": self.channels, "invert": self.invert}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ImageTransform:
        """Builds a transform from :meth:`config`'s keys (missing ones take the defaults).

        Raises:
            ValueError: On an unknown key or an invalid value.
        """
        unknown = set(config) - {"image_size", "channels", "invert"}
        if unknown:
            raise ValueError(
                f"unknown image transform settings {sorted(unknown)}; the settings are "
                "image_size, channels and invert."
            )
        return ImageTransform(**dict(config))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageTransform):
            return NotImplemented
        return self._settings() == other._settings()

    def __hash__(self) -> int:
        return hash(self._settings())

    def __repr__(self) -> str:
        size: Any = self.size
        if size is not None and size[0] == size[1]:
            size = size[0]
        return (
            f"{type(self).__name__}(image_size={size!r}, channels={self.channels}, "
            f"invert={self.invert})"
        )


class OmniglotTransform(ImageTransform):
    """What :class:`~metalight.data.Omniglot` does to each character image: grey, resized
    (28x28 by default), inverted so that strokes are 1 on a 0 background.

    Args:
        image_size: Side of the resized image (``None`` keeps Omniglot's 105).

    Example:
        >>> OmniglotTransform()
        OmniglotTransform(image_size=28, channels=1, invert=True)
    """

    def __init__(self, image_size: int | Sequence[int] | None = 28) -> None:
        super().__init__(image_size, channels=1, invert=True)


def _describe(image: ImageSource, index: int) -> str:
    if isinstance(image, str | os.PathLike):
        return str(image)
    return f"number {index}"
