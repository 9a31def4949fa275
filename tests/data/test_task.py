"""Task / TaskBatch: the contract with the training code."""

from __future__ import annotations

import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import apply_to_collection

from metalight.data import Task, TaskBatch


def make_task(offset: float, ways: int = 3, shots: int = 2, queries: int = 4) -> Task:
    return Task(
        support_x=torch.full((ways * shots, 1, 4, 4), offset),
        support_y=torch.arange(ways).repeat_interleave(shots),
        query_x=torch.full((ways * queries, 1, 4, 4), offset + 0.5),
        query_y=torch.arange(ways).repeat_interleave(queries),
        info=torch.arange(ways) + int(offset),
    )


def test_stack_index_iterate() -> None:
    tasks = [make_task(float(i)) for i in range(5)]
    batch = TaskBatch.stack(tasks)
    assert len(batch) == 5
    assert batch.support_x.shape == (5, 6, 1, 4, 4)
    assert batch.support_y.shape == (5, 6) and batch.support_y.dtype == torch.int64
    assert batch.query_x.shape == (5, 12, 1, 4, 4)
    assert batch.info.shape == (5, 3)
    for i, (task, original) in enumerate(zip(batch, tasks, strict=True)):
        assert isinstance(task, Task)
        assert torch.equal(task.query_x, original.query_x)
        assert torch.equal(batch[i].info, original.info)
    assert torch.equal(batch[-1].support_x, tasks[-1].support_x)
    sliced = batch[1:3]
    assert isinstance(sliced, TaskBatch) and len(sliced) == 2
    with pytest.raises(IndexError, match="out of range"):
        batch[5]


def test_stack_rejects_mismatched_or_empty() -> None:
    with pytest.raises(ValueError, match="support_x shapes differ"):
        TaskBatch.stack([make_task(0.0), make_task(1.0, ways=4)])
    with pytest.raises(ValueError, match="at least one task"):
        TaskBatch.stack([])
    with pytest.raises(ValueError, match="leading task dimension"):
        TaskBatch(
            torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.zeros(3)
        )


def test_to_and_lightning_collection_helpers() -> None:
    batch = TaskBatch.stack([make_task(0.0), make_task(1.0)])
    moved = batch.to(torch.float64)
    assert isinstance(moved, TaskBatch) and moved.support_x.dtype == torch.float64
    assert batch.support_x.dtype == torch.float32  # `to` returns a copy

    # Lightning moves batches with move_data_to_device; it must keep the type.
    on_device = move_data_to_device(batch, torch.device("cpu"))
    assert isinstance(on_device, TaskBatch)
    assert torch.equal(on_device.query_x, batch.query_x)

    # apply_to_collection rebuilds dataclasses field by field (not frozen).
    doubled = apply_to_collection(batch, torch.Tensor, lambda t: t * 2)
    assert isinstance(doubled, TaskBatch)
    assert torch.equal(doubled.support_x, batch.support_x * 2)
    task = apply_to_collection(batch[0], torch.Tensor, lambda t: t + 1)
    assert isinstance(task, Task) and torch.equal(task.info, batch.info[0] + 1)
