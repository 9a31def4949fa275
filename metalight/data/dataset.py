"""In-memory labelled datasets for episodic sampling: one tensor of items, one of labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from metalight.data.sampler import EpisodicSampler

__all__ = ["DatasetSplits", "FewShotDataset"]


class FewShotDataset(Dataset[tuple[Tensor, int]]):
    """A labelled dataset held as one item tensor, grouped by class for episodic sampling.

    Items are stored as given: uint8 images (decoded once, 4x smaller than float) are scaled
    to float32 in ``[0, 1]`` when fetched; floating items are returned as float32.

    Args:
        data: Items, ``[M, ...]`` (images as ``[M, C, H, W]``), uint8 or floating.
        targets: Class of each item, int in ``[0, num_classes)``, length ``M``.
        class_names: One name per class; defaults to ``"0", "1", ...``. Its length fixes
            ``num_classes`` (classes may then be empty).

    Example:
        >>> ds = FewShotDataset(torch.zeros(6, 1, 2, 2, dtype=torch.uint8),
        ...                     torch.tensor([0, 0, 0, 1, 1, 1]), ["a", "b"])
        >>> ds.num_classes, ds.class_indices[1].tolist(), ds[0][0].dtype
        (2, [3, 4, 5], torch.float32)
    """

    def __init__(
        self,
        data: Tensor,
        targets: Tensor | Sequence[int],
        class_names: Sequence[str] | None = None,
    ) -> None:
        targets = torch.as_tensor(targets, dtype=torch.long).flatten()
        if data.shape[0] != targets.numel():
            raise ValueError(
                f"data has {data.shape[0]} items but targets has {targets.numel()} labels; "
                "pass one label per item."
            )
        if class_names is None:
            num_classes = int(targets.max()) + 1 if targets.numel() else 0
            class_names = [str(c) for c in range(num_classes)]
        class_names = [str(n) for n in class_names]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= len(class_names)):
            raise ValueError(
                f"targets must lie in [0, {len(class_names)}) for {len(class_names)} class "
                f"names, got range [{int(targets.min())}, {int(targets.max())}]."
            )
        self.data = data
        self.targets = targets
        self._class_names = class_names
        order = torch.argsort(targets, stable=True)
        counts = torch.bincount(targets, minlength=len(class_names))
        self._class_indices = list(torch.split(order, counts.tolist()))

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self._class_names)

    @property
    def class_names(self) -> list[str]:
        """Name of each class, class ``c`` at position ``c``."""
        return self._class_names

    @property
    def class_indices(self) -> list[Tensor]:
        """Item indices (int64, ascending) of each class, class ``c`` at position ``c``."""
        return self._class_indices

    @property
    def class_sizes(self) -> Tensor:
        """Number of items in each class."""
        return torch.tensor([len(i) for i in self._class_indices], dtype=torch.long)

    def class_to_indices(self) -> dict[int, Tensor]:
        """Returns the mapping ``class id -> item indices``."""
        return dict(enumerate(self._class_indices))

    def fetch(self, indices: Tensor) -> Tensor:
        """Returns the items at int64 ``indices`` as one float32 tensor."""
        x = self.data.index_select(0, indices)
        if x.dtype == torch.uint8:
            return x.to(torch.float32).div_(255.0)
        return x.to(torch.float32)

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.fetch(torch.tensor([index]))[0], int(self.targets[index])

    def subset(self, classes: Sequence[int | str]) -> FewShotDataset:
        """Returns a dataset of the given classes only, relabelled ``0..len(classes)-1``.

        Args:
            classes: Class ids or class names, in the order of the new labels.

        Raises:
            ValueError: On an unknown or repeated class.
        """
        lookup = {name: i for i, name in enumerate(self._class_names)}
        ids: list[int] = []
        for c in classes:
            if isinstance(c, str):
                if c not in lookup:
                    raise ValueError(f"unknown class name {c!r}; see .class_names.")
                ids.append(lookup[c])
            elif 0 <= int(c) < self.num_classes:
                ids.append(int(c))
            else:
                raise ValueError(f"class id {c} is out of range [0, {self.num_classes}).")
        if len(set(ids)) != len(ids):
            raise ValueError("subset() got a class more than once; pass each class once.")
        if not ids:
            return FewShotDataset(self.data[:0], torch.zeros(0, dtype=torch.long), [])
        items = torch.cat([self._class_indices[c] for c in ids])
        labels = torch.cat(
            [torch.full((len(self._class_indices[c]),), i) for i, c in enumerate(ids)]
        )
        return FewShotDataset(
            self.data.index_select(0, items), labels, [self._class_names[c] for c in ids]
        )

    def with_rotations(self, quarter_turns: Sequence[int] = (0, 1, 2, 3)) -> FewShotDataset:
        """Returns a dataset where each rotation of each class is a new class.

        This is the Omniglot class augmentation: the 90/180/270-degree rotations of a
        character are new characters. Rotation ``quarter_turns[i]`` of class ``c`` becomes
        class ``i * num_classes + c`` and its images are
        ``torch.rot90(image, quarter_turns[i], dims=(-2, -1))`` of the stored tensor (no
        re-decoding). Names get a ``@rot90``-style suffix except for turn 0.

        Args:
            quarter_turns: Distinct multiples of 90 degrees in ``0..3``.

        Raises:
            ValueError: On invalid turns, or odd turns of non-square images.

        Example:
            >>> ds = FewShotDataset(torch.zeros(4, 1, 3, 3), torch.tensor([0, 0, 1, 1]))
            >>> ds.with_rotations().num_classes
            8
        """
        turns = [int(k) for k in quarter_turns]
        if not turns or len(set(turns)) != len(turns) or any(k not in range(4) for k in turns):
            raise ValueError(
                f"quarter_turns must be distinct values in 0..3, got {list(quarter_turns)}."
            )
        if self.data.dim() < 3:
            raise ValueError("with_rotations() needs image items of shape [..., H, W].")
        height, width = self.data.shape[-2:]
        if height != width and any(k % 2 for k in turns):
            raise ValueError(
                f"90/270-degree rotations need square images, got {height}x{width}; "
                "resize to a square image_size or use quarter_turns=(0, 2)."
            )
        data = torch.cat([torch.rot90(self.data, k, dims=(-2, -1)) for k in turns])
        targets = torch.cat([self.targets + i * self.num_classes for i in range(len(turns))])
        names = [
            name if k == 0 else f"{name}@rot{90 * k}" for k in turns for name in self._class_names
        ]
        return FewShotDataset(data, targets, names)

    def sampler(self, ways: int, shots: int, queries: int) -> EpisodicSampler:
        """Returns an :class:`EpisodicSampler` drawing N-way K-shot tasks from this dataset."""
        return EpisodicSampler.from_dataset(self, ways=ways, shots=shots, queries=queries)

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.data.shape[1:])
        return (
            f"{type(self).__name__}(classes={self.num_classes}, items={len(self)}, "
            f"item_shape={shape}, dtype={self.data.dtype})"
        )


class DatasetSplits(NamedTuple):
    """Class-disjoint train/validation/test datasets."""

    train: FewShotDataset
    val: FewShotDataset
    test: FewShotDataset
