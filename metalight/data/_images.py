"""Image decoding and the on-disk tensor cache shared by the image datasets."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

__all__ = [
    "IMAGE_EXTENSIONS",
    "cached_tensors",
    "decode_image",
    "decode_images",
    "load_image_files",
    "normalize_size",
    "pil_to_tensor",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# Bump when decoding changes so stale cache files are not reused.
_CACHE_FORMAT = 1


def normalize_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """Turns ``28`` or ``(h, w)`` into ``(h, w)``; ``None`` keeps images at their stored size."""
    if image_size is None:
        return None
    if isinstance(image_size, int):
        sides = [image_size, image_size]
    else:
        sides = [int(s) for s in image_size]
    if len(sides) != 2 or min(sides) <= 0:
        raise ValueError(
            f"image_size must be a positive int or (height, width), got {image_size!r}."
        )
    return sides[0], sides[1]


def decode_image(
    data: bytes,
    name: str,
    size: tuple[int, int] | None,
    channels: int,
    invert: bool = False,
) -> Tensor:
    """Decodes one encoded image into a uint8 ``[channels, H, W]`` tensor.

    Args:
        data: The encoded file contents (PNG, JPEG, ...).
        name: File name for error messages.
        size: ``(height, width)`` to resize to (antialiased Lanczos), or ``None``.
        channels: 1 (grayscale) or 3 (RGB).
        invert: Store ``255 - value`` (Omniglot: strokes become 1).

    Raises:
        ValueError: If the file cannot be decoded; the message names it.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return pil_to_tensor(img, size, channels, invert)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ValueError(
            f"cannot decode image file {name}: {err}. The file is corrupt or not an image; "
            "replace or delete it."
        ) from err


def pil_to_tensor(
    img: Image.Image, size: tuple[int, int] | None, channels: int, invert: bool = False
) -> Tensor:
    """Converts an opened PIL image as :func:`decode_image` does (the one code path both use).

    Args:
        img: The image, in any PIL mode.
        size: ``(height, width)`` to resize to (antialiased Lanczos), or ``None``.
        channels: 1 (grayscale) or 3 (RGB).
        invert: Store ``255 - value``.

    Returns:
        A uint8 ``[channels, H, W]`` tensor.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
    img = img.convert("L" if channels == 1 else "RGB")
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    width, height = img.size
    raw = bytearray(img.tobytes())
    x = torch.frombuffer(raw, dtype=torch.uint8).view(height, width, channels)
    x = x.permute(2, 0, 1).contiguous()
    return 255 - x if invert else x


def decode_images(
    sources: Iterable[tuple[str, Callable[[], bytes]]],
    size: tuple[int, int] | None,
    channels: int,
    invert: bool = False,
) -> Tensor:
    """Decodes images into one uint8 ``[M, channels, H, W]`` tensor.

    Args:
        sources: ``(name, read)`` pairs; ``read()`` returns the encoded bytes.
        size: Target ``(height, width)`` or ``None`` (then all images must share a size).
        channels: 1 or 3.
        invert: See :func:`decode_image`.

    Raises:
        ValueError: On an undecodable image, or (with ``size=None``) an image whose size
            differs from the first one; the message names the file.
    """
    images: list[Tensor] = []
    first: tuple[str, tuple[int, ...]] | None = None
    for name, read in sources:
        x = decode_image(read(), name, size, channels, invert)
        if first is None:
            first = (name, tuple(x.shape))
        elif tuple(x.shape) != first[1]:
            raise ValueError(
                f"image {name} has shape {tuple(x.shape)} but {first[0]} has {first[1]}; "
                "pass an image_size to resize every image to one size."
            )
        images.append(x)
    if not images:
        return torch.zeros(0, channels, *(size or (0, 0)), dtype=torch.uint8)
    return torch.stack(images)


def cached_tensors(
    cache_dir: str | os.PathLike[str] | None,
    prefix: str,
    key: Any,
    build: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """Returns ``build()``, stored in ``cache_dir`` under a hash of ``key`` and reused.

    The cache file is written to a temporary name then renamed, so concurrent processes and
    interrupted runs never see a partial file.

    Args:
        cache_dir: Folder for cache files, created if missing; ``None`` disables caching.
        prefix: Readable start of the file name (e.g. ``"omniglot"``).
        key: JSON-serialisable description of everything the result depends on.
        build: Computes the result: a dict of tensors, lists and plain values.
    """
    if cache_dir is None:
        return build()
    blob = json.dumps({"format": _CACHE_FORMAT, "key": key}, sort_keys=True).encode()
    digest = hashlib.sha256(blob).hexdigest()[:20]
    folder = Path(cache_dir)
    path = folder / f"{prefix}-{digest}.pt"
    cached = _load_cache(path)
    if cached is not None:
        return cached
    result = build()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{prefix}-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(result, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return result


def _load_cache(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:
        # A damaged or foreign cache file is rebuilt rather than failing the run.
        return None


def load_image_files(
    files: Sequence[Path],
    targets: Sequence[int],
    class_names: Sequence[str],
    *,
    size: tuple[int, int] | None,
    channels: int,
    invert: bool,
    cache_dir: str | os.PathLike[str] | None,
    prefix: str,
) -> dict[str, Any]:
    """Decodes image files into ``{"data", "targets", "class_names"}``, cached if asked.

    The cache key covers each file's path, size and modification time, so edited folders
    are decoded again.

    Raises:
        FileNotFoundError: If a listed file is missing (the message names it).
        ValueError: If a file cannot be decoded (the message names it).
    """
    stats = []
    for path in files:
        try:
            st = path.stat()
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"image file {path} is listed but does not exist; restore it or remove it "
                "from the listing."
            ) from err
        stats.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    key = {
        "files": hashlib.sha256("\n".join(stats).encode()).hexdigest(),
        "targets": hashlib.sha256(repr(list(targets)).encode()).hexdigest(),
        "classes": list(class_names),
        "size": size,
        "channels": channels,
        "invert": invert,
    }

    def build() -> dict[str, Any]:
        data = decode_images(((str(p), p.read_bytes) for p in files), size, channels, invert)
        return {
            "data": data,
            "targets": torch.tensor(list(targets), dtype=torch.long),
            "class_names": list(class_names),
        }

    return cached_tensors(cache_dir, prefix, key, build)
