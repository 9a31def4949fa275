"""Sinusoid regression tasks: MAML's distribution, shapes and the query grid."""

from __future__ import annotations

import math

import pytest
import torch

from metalight.data import SinusoidTasks, TaskBatch, TrainTaskStream


def test_shapes_and_targets() -> None:
    task = SinusoidTasks(shots=10, queries=7).sample(torch.Generator().manual_seed(0))
    assert task.support_x.shape == task.support_y.shape == (10, 1)
    assert task.query_x.shape == task.query_y.shape == (7, 1)
    assert task.support_x.dtype == task.support_y.dtype == torch.float32
    amplitude, phase = task.info.tolist()
    assert torch.allclose(task.query_y, amplitude * torch.sin(task.query_x - phase))


def test_distribution_ranges() -> None:
    tasks = SinusoidTasks(shots=5, queries=5)
    stream = TrainTaskStream(tasks, meta_batch_size=500, num_batches=4, seed=0)
    batch = TaskBatch.stack([t for b in stream for t in b])  # 2000 tasks
    amplitude, phase = batch.info[:, 0], batch.info[:, 1]
    assert 0.1 <= float(amplitude.min()) < 0.2 and 4.9 < float(amplitude.max()) <= 5.0
    assert 0.0 <= float(phase.min()) < 0.05 and math.pi - 0.05 < float(phase.max()) <= math.pi
    assert abs(float(amplitude.mean()) - 2.55) < 0.15
    x = torch.cat([batch.support_x, batch.query_x], dim=1)
    assert -5.0 <= float(x.min()) < -4.99 and 4.99 < float(x.max()) <= 5.0
    assert abs(float(x.mean())) < 0.1
    assert float(batch.query_y.abs().max()) <= 5.0


def test_query_grid() -> None:
    task = SinusoidTasks(shots=10, query_grid=True).sample(torch.Generator().manual_seed(1))
    assert task.query_x.shape == task.query_y.shape == (100, 1)
    assert torch.allclose(task.query_x.squeeze(1), torch.linspace(-5, 5, 100))
    assert task.support_x.shape == (10, 1)


def test_invalid_settings() -> None:
    with pytest.raises(ValueError, match="shots must be a positive integer, got 0"):
        SinusoidTasks(shots=0)
    with pytest.raises(ValueError, match="amplitude_range must be"):
        SinusoidTasks(amplitude_range=(5.0, 0.1))
