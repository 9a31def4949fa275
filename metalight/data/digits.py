"""scikit-learn's bundled handwritten digits (1,797 8x8 images) for bilevel problems.

Needs no download: the images ship inside scikit-learn (``sklearn.datasets.load_digits``).
One training "task" is one outer step of a bilevel problem: ``inner_steps`` minibatches of
training examples (the support set, with each example's position in the training split in
``Task.info``) and a minibatch of validation examples (the query set). Validation and test
"tasks" hold a whole split as their query set.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from metalight.data.datamodule import TaskDataModule
from metalight.data.sampler import TaskSampler
from metalight.data.task import Task

__all__ = ["DIGITS_SIZE", "DigitsDataModule", "NoisyDigitsDataModule", "flip_labels", "load_digits"]

DIGITS_SIZE = 1797
"""The number of images in scikit-learn's digits."""


def load_digits() -> tuple[Tensor, Tensor]:
    """All digits as ``(x [1797, 64] float32 in [0, 1], y [1797] int64)``.

    Raises:
        ImportError: when scikit-learn is not installed (with the command that installs it).
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise ImportError(
            "the digits data ships with scikit-learn, which is not installed: "
            "pip install scikit-learn"
        ) from None
    data = sklearn_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32) / 16.0
    return x, torch.as_tensor(data.target, dtype=torch.int64)


def flip_labels(
    y: Tensor, fraction: float, seed: int, num_classes: int = 10
) -> tuple[Tensor, Tensor]:
    """Flip a fixed fraction of labels, each to another class drawn uniformly.

    Args:
        y: the labels.
        fraction: the share of labels to flip (``round(fraction * len(y))`` of them).
        seed: chooses which labels flip and to what.
        num_classes: the number of classes.

    Returns:
        ``(noisy labels, mask of the flipped ones)``.

    Example:
        >>> noisy, flipped = flip_labels(torch.arange(10) % 10, 0.4, seed=0)
        >>> int(flipped.sum()), bool((noisy[flipped] != (torch.arange(10) % 10)[flipped]).all())
        (4, True)
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the flipped fraction must lie in [0, 1], got {fraction!r}")
    generator = torch.Generator().manual_seed(int(seed))
    count = round(fraction * len(y))
    chosen = torch.randperm(len(y), generator=generator)[:count]
    shift = torch.randint(1, num_classes, (count,), generator=generator)
    noisy = y.clone()
    noisy[chosen] = (y[chosen] + shift) % num_classes
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[chosen] = True
    return noisy, mask


class _OuterSteps:
    """One outer step: ``inner_steps`` training minibatches and a validation minibatch."""

    def __init__(
        self, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], steps: int, size: int,
        val_size: int,
    ) -> None:  # fmt: skip
        self.train, self.val = train, val
        self.steps, self.size, self.val_size = steps, size, val_size

    def sample(self, generator: torch.Generator) -> Task:
        n = len(self.train[1])
        index = torch.cat(
            [torch.randperm(n, generator=generator)[: self.size] for _ in range(self.steps)]
        )
        val = torch.randperm(len(self.val[1]), generator=generator)[: self.val_size]
        x, y = self.train
        return Task(x[index], y[index], self.val[0][val], self.val[1][val], index)


class _WholeSplit:
    """A split as the query set of one task (nothing to adapt on)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def sample(self, generator: torch.Generator) -> Task:
        empty = self.x[:0]
        return Task(empty, self.y[:0], self.x, self.y, torch.zeros(0, dtype=torch.int64))


class DigitsDataModule(TaskDataModule):
    """Digits split into train/validation/test for bilevel problems (no download).

    The split is a fixed random permutation (``split_seed``), the same whatever the
    training ``seed``. Each training batch is one outer step: ``inner_steps`` minibatches of
    ``batch_size`` training examples (each drawn without replacement) and ``val_batch_size``
    validation examples. Validation and test batches hold their whole split.

    Args:
        inner_steps: the inner steps of one outer step (the algorithm's ``inner_steps``).
        batch_size: training examples per inner step.
        val_batch_size: validation examples per outer step.
        train_size: training examples (the rest of the 1,797 after validation and test).
        val_size: validation examples.
        test_size: test examples.
        split_seed: the permutation that splits the data.
        train_batches_per_epoch: outer steps per epoch.
        **kwargs: :class:`~metalight.data.TaskDataModule` arguments (``seed``,
            ``meta_batch_size``: the number of devices, ...).

    Example:
        >>> dm = DigitsDataModule(inner_steps=5, batch_size=8)
        >>> next(iter(dm.train_dataloader())).support_x.shape
        torch.Size([1, 40, 64])
    """

    def __init__(
        self,
        *,
        inner_steps: int = 20,
        batch_size: int = 32,
        val_batch_size: int = 128,
        train_size: int = 1097,
        val_size: int = 300,
        test_size: int = 400,
        split_seed: int = 0,
        train_batches_per_epoch: int = 100,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("meta_batch_size", 1)
        kwargs.setdefault("val_episodes", 1)
        kwargs.setdefault("test_episodes", 1)
        super().__init__(train_batches_per_epoch=train_batches_per_epoch, **kwargs)
        sizes = {
            "inner_steps": inner_steps,
            "batch_size": batch_size,
            "val_batch_size": val_batch_size,
            "train_size": train_size,
            "val_size": val_size,
            "test_size": test_size,
        }
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if train_size + val_size + test_size > DIGITS_SIZE:
            raise ValueError(
                f"train_size + val_size + test_size = {train_size + val_size + test_size} "
                f"exceeds the {DIGITS_SIZE} digits; make the splits smaller"
            )
        if batch_size > train_size or val_batch_size > val_size:
            raise ValueError(
                f"batch_size ({batch_size}) and val_batch_size ({val_batch_size}) must not "
                f"exceed train_size ({train_size}) and val_size ({val_size})"
            )
        self.inner_steps = inner_steps
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.train_size, self.val_size, self.test_size = train_size, val_size, test_size
        self.split_seed = int(split_seed)
        self._splits: dict[str, tuple[Tensor, Tensor]] | None = None

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{"train", "val", "test"}: (x, y)``, loaded once."""
        if self._splits is None:
            x, y = load_digits()
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
            test = order[: self.test_size]
            val = order[self.test_size : self.test_size + self.val_size]
            start = self.test_size + self.val_size
            train = order[start : start + self.train_size]
            self._splits = {
                "train": self.corrupt(x[train], y[train]),
                "val": (x[val], y[val]),
                "test": (x[test], y[test]),
            }
        return self._splits

    def corrupt(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The training split as trained on (subclasses add label noise)."""
        return x, y

    def split_tensors(self, split: str) -> tuple[Tensor, Tensor]:
        """``(inputs [n, 64], labels [n])`` of ``"train"``, ``"val"`` or ``"test"``."""
        splits = self.load_splits()
        if split not in splits:
            raise KeyError(f"no split {split!r}; the splits are train, val and test")
        return splits[split]

    def build_samplers(self) -> dict[str, TaskSampler]:
        """One outer step per training task; whole splits for validation and test."""
        splits = self.load_splits()
        return {
            "train": _OuterSteps(
                splits["train"], splits["val"], self.inner_steps, self.batch_size,
                self.val_batch_size,
            ),
            "val": _WholeSplit(*splits["val"]),
            "test": _WholeSplit(*splits["test"]),
        }  # fmt: skip


class NoisyDigitsDataModule(DigitsDataModule):
    """Digits whose training labels are partly wrong: a fixed, seeded fraction is flipped.

    Validation and test labels stay clean (the clean validation set of Ren et al., 2018).

    Args:
        noise: the fraction of training labels flipped to another class.
        noise_seed: which labels flip, and to what.
        **kwargs: :class:`DigitsDataModule` arguments.
    """

    def __init__(self, *, noise: float = 0.4, noise_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(noise, int | float) or not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be a fraction in [0, 1], got {noise!r}")
        self.noise = float(noise)
        self.noise_seed = int(noise_seed)
        self.noisy_mask: Tensor | None = None

    def corrupt(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Flips ``noise`` of the training labels; ``noisy_mask`` marks them."""
        noisy, self.noisy_mask = flip_labels(y, self.noise, self.noise_seed)
        return x, noisy
