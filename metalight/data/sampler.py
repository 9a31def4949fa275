"""Episodic N-way K-shot task sampling over labelled datasets."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from metalight.data._threads import single_threaded
from metalight.data._validation import check_positive
from metalight.data.task import Task

__all__ = ["ClassIndexedDataset", "EpisodicSampler", "TaskSampler"]


@runtime_checkable
class TaskSampler(Protocol):
    """Anything that draws one task from a random generator.

    All randomness must come from ``generator`` so that a task is a pure function of the
    generator's seed; the streams in :mod:`metalight.data.streams` rely on that.
    """

    def sample(self, generator: torch.Generator) -> Task:
        """Draws one task using only ``generator`` for randomness."""
        ...


class ClassIndexedDataset(Protocol):
    """A labelled dataset that exposes its examples grouped by class.

    :class:`~metalight.data.dataset.FewShotDataset` implements it.
    """

    @property
    def class_indices(self) -> Sequence[Tensor]:
        """Item indices of each class, class ``c`` at position ``c``."""
        ...

    @property
    def class_names(self) -> Sequence[str]:
        """A readable name per class, used in error messages."""
        ...

    def fetch(self, indices: Tensor) -> Tensor:
        """Returns the stacked item tensors for int64 ``indices``."""
        ...


class EpisodicSampler:
    """Draws N-way K-shot classification tasks from items grouped by class.

    A task picks ``ways`` distinct classes in a random order (way ``j`` is relabelled ``j``),
    then ``shots + queries`` distinct items of each without replacement. The support set holds
    ``ways * shots`` items and the query set ``ways * queries``, both ordered by way.
    ``Task.info`` holds the class id of each way.

    Args:
        class_indices: Item indices per class, either a mapping ``class id -> indices`` or a
            sequence whose position is the class id.
        fetch: Maps an int64 tensor of item indices to the stacked item tensors.
        ways: Classes per task (N).
        shots: Support examples per class (K).
        queries: Query examples per class (Q).
        class_names: Optional names per class (same keys/positions as ``class_indices``) for
            error messages.

    Raises:
        ValueError: If a number is not positive, there are fewer classes than ``ways``, or a
            class has fewer items than ``shots + queries`` (the message names the class).

    Example:
        >>> data = torch.arange(40.0).view(20, 2)
        >>> sampler = EpisodicSampler([range(0, 10), range(10, 20)], data.__getitem__,
        ...                           ways=2, shots=1, queries=3)
        >>> task = sampler.sample(torch.Generator().manual_seed(0))
        >>> task.support_x.shape, task.query_y.tolist()
        (torch.Size([2, 2]), [0, 0, 0, 1, 1, 1])
    """

    def __init__(
        self,
        class_indices: Mapping[int, Sequence[int] | Tensor] | Sequence[Sequence[int] | Tensor],
        fetch: Callable[[Tensor], Tensor],
        ways: int,
        shots: int,
        queries: int,
        class_names: Mapping[int, str] | Sequence[str] | None = None,
    ) -> None:
        check_positive(ways=ways, shots=shots, queries=queries)
        if isinstance(class_indices, Mapping):
            ids = list(class_indices.keys())
            groups = [class_indices[c] for c in ids]
        else:
            ids = list(range(len(class_indices)))
            groups = list(class_indices)
        if class_names is None:
            names = [f"class {c}" for c in ids]
        elif isinstance(class_names, Mapping):
            names = [str(class_names[c]) for c in ids]
        else:
            names = [str(class_names[i]) for i in range(len(ids))]

        if ways > len(ids):
            raise ValueError(
                f"cannot draw {ways}-way tasks from a dataset with {len(ids)} classes; "
                f"set ways to at most {len(ids)} or use a dataset with more classes "
                "(for Omniglot, rotations add classes)."
            )
        needed = shots + queries
        tensors = [
            g.flatten().to(torch.long)
            if isinstance(g, Tensor)
            else torch.tensor(list(g), dtype=torch.long)
            for g in groups
        ]
        sizes = torch.tensor([t.numel() for t in tensors], dtype=torch.long)
        short = (sizes < needed).nonzero().flatten().tolist()
        if short:
            listed = ", ".join(f"{names[i]!r} has {int(sizes[i])}" for i in short[:5])
            more = f" (and {len(short) - 5} more classes)" if len(short) > 5 else ""
            raise ValueError(
                f"{len(short)} class(es) have fewer than shots + queries = {shots} + {queries} "
                f"= {needed} items: {listed}{more}. Lower shots or queries, or remove those "
                "classes from the dataset."
            )

        self.ways = ways
        self.shots = shots
        self.queries = queries
        self.num_classes = len(ids)
        self._fetch = fetch
        self._class_ids = torch.tensor(ids, dtype=torch.long)
        width = int(sizes.max())
        # One padded [classes, max_size] table lets a task gather all its items in one indexing op.
        self._table = torch.zeros(len(ids), width, dtype=torch.long)
        for row, t in zip(self._table, tensors, strict=True):
            row[: t.numel()] = t
        self._sizes = sizes
        self._uniform = bool((sizes == width).all())
        self._pad_mask = torch.arange(width).unsqueeze(0) >= sizes.unsqueeze(1)
        self._support_y = torch.arange(ways).repeat_interleave(shots)
        self._query_y = torch.arange(ways).repeat_interleave(queries)

    @classmethod
    def from_dataset(
        cls, dataset: ClassIndexedDataset, ways: int, shots: int, queries: int
    ) -> EpisodicSampler:
        """Builds a sampler over a :class:`ClassIndexedDataset` such as ``FewShotDataset``.

        Example:
            >>> from metalight.data import FewShotDataset
            >>> ds = FewShotDataset(torch.zeros(30, 1, 4, 4), torch.arange(3).repeat(10))
            >>> EpisodicSampler.from_dataset(ds, ways=3, shots=2, queries=3).num_classes
            3
        """
        return cls(
            dataset.class_indices,
            dataset.fetch,
            ways=ways,
            shots=shots,
            queries=queries,
            class_names=dataset.class_names,
        )

    def sample(self, generator: torch.Generator) -> Task:
        """Draws one task using only ``generator`` for randomness.

        Args:
            generator: A CPU ``torch.Generator``; the task is a pure function of its state.

        Returns:
            A :class:`Task` with ``support_x [N*K, ...]``, ``support_y [N*K]`` (int64),
            ``query_x [N*Q, ...]``, ``query_y [N*Q]`` and ``info [N]`` (class ids).
        """
        with single_threaded():
            n, k = self.ways, self.shots
            classes = torch.randperm(self.num_classes, generator=generator)[:n]
            keys = torch.rand(n, self._table.shape[1], generator=generator)
            if not self._uniform:
                keys.masked_fill_(self._pad_mask[classes], 2.0)  # padding sorts after real items
            # Sorting uniform keys is a random permutation; its first K+Q entries are the picks.
            picks = keys.argsort(dim=1)[:, : k + self.queries]
            items = self._table[classes.unsqueeze(1), picks]
            flat = torch.cat([items[:, :k].reshape(-1), items[:, k:].reshape(-1)])
            x = self._fetch(flat)
            return Task(
                support_x=x[: n * k],
                support_y=self._support_y.clone(),
                query_x=x[n * k :],
                query_y=self._query_y.clone(),
                info=self._class_ids[classes],
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ways={self.ways}, shots={self.shots}, "
            f"queries={self.queries}, classes={self.num_classes})"
        )
