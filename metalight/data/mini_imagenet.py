"""mini-ImageNet in the Ravi & Larochelle layout: ``<split>.csv`` files over ``images/``."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from metalight.data._images import load_image_files, normalize_size
from metalight.data.dataset import FewShotDataset

__all__ = ["MINI_IMAGENET_SPLITS", "MiniImageNet"]

MINI_IMAGENET_SPLITS = ("train", "val", "test")


class MiniImageNet(FewShotDataset):
    """One split of mini-ImageNet (64/16/20 classes of 600 images), 84x84 RGB.

    Reads ``root/<split>.csv`` (header ``filename,label``) and the images it lists from
    ``root/images/``, the layout of Ravi & Larochelle (2017). Classes are the sorted labels
    (WordNet ids); images keep the CSV order within a class.

    Args:
        root: Folder holding ``train.csv``, ``val.csv``, ``test.csv`` and ``images/``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: Side of the images (84 is standard) or ``(height, width)``.
        cache_dir: Optional folder for a decoded-tensor cache (decoding 60,000 JPEGs takes a
            while; the cache makes later runs start in seconds).

    Raises:
        FileNotFoundError: If ``root``, the CSV, ``images/`` or a listed image is missing.
        ValueError: On a malformed CSV or an undecodable image (named in the message).

    Example:
        >>> train = MiniImageNet("data/miniimagenet", "train", cache_dir="cache")  # doctest: +SKIP
        >>> train.num_classes  # doctest: +SKIP
        64
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        image_size: int | Sequence[int] = 84,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if split not in MINI_IMAGENET_SPLITS:
            raise ValueError(f"split must be one of {MINI_IMAGENET_SPLITS}, got {split!r}.")
        root = Path(root).expanduser()
        layout = f"{root}/{{train,val,test}}.csv and {root}/images/"
        if not root.is_dir():
            raise FileNotFoundError(
                f"mini-ImageNet root folder {root} does not exist; expected {layout} "
                "(the Ravi & Larochelle split files and the 84x84 images)."
            )
        csv_path = root / f"{split}.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(
                f"mini-ImageNet split file {csv_path} is missing; expected {layout}."
            )
        image_dir = root / "images"
        if not image_dir.is_dir():
            raise FileNotFoundError(
                f"mini-ImageNet image folder {image_dir} is missing; expected {layout}."
            )
        rows = _read_split(csv_path)
        class_names = sorted({label for _, label in rows})
        label_of = {name: i for i, name in enumerate(class_names)}
        # Group by class (stable) so each class's items are contiguous in the tensor.
        rows.sort(key=lambda row: label_of[row[1]])
        loaded = load_image_files(
            [image_dir / name for name, _ in rows],
            [label_of[label] for _, label in rows],
            class_names,
            size=normalize_size(image_size),
            channels=3,
            invert=False,
            cache_dir=cache_dir,
            prefix=f"mini_imagenet_{split}",
        )
        super().__init__(loaded["data"], loaded["targets"], loaded["class_names"])
        self.root = root
        self.split = split


def _read_split(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != ["filename", "label"]:
            raise ValueError(
                f"{path} must start with the header 'filename,label', got {header}; use the "
                "Ravi & Larochelle split files."
            )
        rows = []
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise ValueError(f"{path}, line {line_no}: expected 'filename,label', got {row}.")
            rows.append((row[0].strip(), row[1].strip()))
    if not rows:
        raise ValueError(f"{path} lists no images; use the Ravi & Larochelle split files.")
    return rows
