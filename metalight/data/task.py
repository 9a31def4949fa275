"""Few-shot tasks and meta-batches: the data contract between samplers and training code."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from torch import Tensor

__all__ = ["Task", "TaskBatch"]

_FIELDS = ("support_x", "support_y", "query_x", "query_y", "info")


# eq=False: the generated __eq__ would compare tensors element-wise and fail on `bool(...)`.
@dataclass(eq=False)
class Task:
    """One few-shot task: a support set to adapt on and a query set to evaluate on.

    Classification tasks hold ``N * K`` support and ``N * Q`` query examples ordered by way
    (all examples of way 0 first) with int64 labels ``0..N-1``; ``info`` holds the dataset
    class index of each way. Regression tasks hold float targets of shape ``[n, 1]`` and
    task parameters in ``info`` (``(amplitude, phase)`` for sinusoids).

    Attributes:
        support_x: Support inputs, ``[n_support, ...]``.
        support_y: Support targets, ``[n_support]`` (labels) or ``[n_support, 1]``.
        query_x: Query inputs, ``[n_query, ...]``.
        query_y: Query targets, ``[n_query]`` (labels) or ``[n_query, 1]``.
        info: Per-task metadata: class ids of the ways, or regression parameters.

    Example:
        >>> task = Task(torch.zeros(5, 1), torch.arange(5), torch.zeros(10, 1),
        ...             torch.arange(5).repeat_interleave(2), torch.arange(5))
        >>> task.to("cpu").support_x.shape
        torch.Size([5, 1])
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    info: Tensor

    def to(self, *args: Any, **kwargs: Any) -> Task:
        """Returns a copy with every tensor moved/cast by ``Tensor.to(*args, **kwargs)``."""
        return Task(*(getattr(self, f).to(*args, **kwargs) for f in _FIELDS))


@dataclass(eq=False)
class TaskBatch:
    """A meta-batch: the fields of :class:`Task` stacked over a leading task dimension ``B``.

    Not frozen, so Lightning's ``apply_to_collection`` can rebuild it; ``to`` also makes it a
    transferable type for Lightning's ``move_data_to_device``.

    Attributes:
        support_x: ``[B, n_support, ...]``.
        support_y: ``[B, n_support]`` (labels) or ``[B, n_support, 1]``.
        query_x: ``[B, n_query, ...]``.
        query_y: ``[B, n_query]`` (labels) or ``[B, n_query, 1]``.
        info: ``[B, ...]`` per-task metadata.

    Example:
        >>> t = Task(torch.zeros(5, 1), torch.arange(5), torch.zeros(5, 1),
        ...          torch.arange(5), torch.arange(5))
        >>> batch = TaskBatch.stack([t, t, t])
        >>> len(batch), batch.support_x.shape, batch[0].info.tolist()
        (3, torch.Size([3, 5, 1]), [0, 1, 2, 3, 4])
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    info: Tensor

    def __post_init__(self) -> None:
        sizes = {f: getattr(self, f).shape[0] if getattr(self, f).dim() else None for f in _FIELDS}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(
                f"TaskBatch fields must share the leading task dimension, got sizes {sizes}; "
                "build batches with TaskBatch.stack(tasks)."
            )

    @classmethod
    def stack(cls, tasks: Sequence[Task]) -> TaskBatch:
        """Stacks tasks of identical shapes into a meta-batch.

        Args:
            tasks: At least one task; all must have the same field shapes.

        Returns:
            The stacked meta-batch.

        Raises:
            ValueError: If ``tasks`` is empty or the task shapes differ.
        """
        if len(tasks) == 0:
            raise ValueError("TaskBatch.stack needs at least one task, got an empty sequence.")
        stacked = {}
        for f in _FIELDS:
            values = [getattr(t, f) for t in tasks]
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise ValueError(
                    f"cannot stack tasks whose {f} shapes differ ({sorted(shapes)}); "
                    "every task of a meta-batch must have the same ways, shots and queries."
                )
            stacked[f] = torch.stack(values)
        return cls(**stacked)

    def __len__(self) -> int:
        return self.support_x.shape[0]

    @overload
    def __getitem__(self, index: int) -> Task: ...

    @overload
    def __getitem__(self, index: slice) -> TaskBatch: ...

    def __getitem__(self, index: int | slice) -> Task | TaskBatch:
        """Returns task ``index`` as a :class:`Task`, or a :class:`TaskBatch` for a slice."""
        if isinstance(index, slice):
            return TaskBatch(*(getattr(self, f)[index] for f in _FIELDS))
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"task index {index} is out of range for a TaskBatch of {n} tasks")
        return Task(*(getattr(self, f)[index] for f in _FIELDS))

    def __iter__(self) -> Iterator[Task]:
        for i in range(len(self)):
            yield self[i]

    def to(self, *args: Any, **kwargs: Any) -> TaskBatch:
        """Returns a copy with every tensor moved/cast by ``Tensor.to(*args, **kwargs)``."""
        return TaskBatch(*(getattr(self, f).to(*args, **kwargs) for f in _FIELDS))

    def pin_memory(self) -> TaskBatch:
        """Returns a copy in pinned memory (called by ``DataLoader(pin_memory=True)``)."""
        return TaskBatch(*(getattr(self, f).pin_memory() for f in _FIELDS))
