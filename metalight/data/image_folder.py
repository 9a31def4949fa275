"""Any folder of class folders (``root/<class>/<image files>``) as a few-shot dataset."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from metalight.data._images import IMAGE_EXTENSIONS, load_image_files
from metalight.data.dataset import FewShotDataset
from metalight.data.transforms import ImageTransform

__all__ = ["ImageFolder"]


class ImageFolder(FewShotDataset):
    """Images under ``root/<class name>/`` as a :class:`FewShotDataset`, one class per folder.

    Class folders are sorted by name; the image files directly inside each are sorted by
    name. Images are decoded once into one uint8 tensor (``[M, channels, H, W]``) and
    returned as float in ``[0, 1]``.

    Args:
        root: Folder of class folders.
        image_size: Resize to ``size`` x ``size`` or ``(height, width)``; ``None`` keeps the
            stored size (all images must then share it).
        channels: 1 (grayscale) or 3 (RGB).
        invert: Store ``1 - value`` (dark strokes on white become 1, as for Omniglot).
        extensions: File name endings that count as images (case-insensitive).
        cache_dir: Optional folder for a decoded-tensor cache reused across runs.

    Attributes:
        transform: The :class:`~metalight.data.transforms.ImageTransform` every image went
            through; apply it to a new image to get what the model saw.

    Raises:
        FileNotFoundError: If ``root`` does not exist.
        ValueError: If there are no class folders, a class folder holds no images, or an
            image cannot be decoded; the message names the folder or file.

    Example:
        >>> ds = ImageFolder("data/my_classes", image_size=32, channels=1)  # doctest: +SKIP
        >>> sampler = ds.sampler(ways=5, shots=1, queries=5)  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: int | Sequence[int] | None = 84,
        channels: int = 3,
        invert: bool = False,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        root = Path(root).expanduser()
        transform = ImageTransform(image_size, channels, invert)
        if not root.is_dir():
            raise FileNotFoundError(
                f"image folder root {root} does not exist; expected a folder laid out as "
                f"{root}/<class name>/<image files>."
            )
        endings = tuple(e.lower() for e in extensions)
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise ValueError(
                f"{root} contains no class folders; put the images of each class in their own "
                f"folder {root}/<class name>/."
            )
        files: list[Path] = []
        targets: list[int] = []
        for label, folder in enumerate(class_dirs):
            images = sorted(
                p
                for p in folder.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(endings)
            )
            if not images:
                raise ValueError(
                    f"class folder {folder} contains no image files (looked for "
                    f"{', '.join(endings)}); add images or remove the folder."
                )
            files.extend(images)
            targets.extend([label] * len(images))
        loaded = load_image_files(
            files,
            targets,
            [p.name for p in class_dirs],
            size=transform.size,
            channels=transform.channels,
            invert=transform.invert,
            cache_dir=cache_dir,
            prefix="image_folder",
        )
        super().__init__(loaded["data"], loaded["targets"], loaded["class_names"])
        self.root = root
        self.transform = transform
