"""Gaps found in a review of the guards, each fixed since; these are their regression tests.

A newly found gap goes here as a strict xfail (its reason saying where the fix belongs), so it
fails loudly once fixed; then the marker is removed.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from metalight.algorithms import MAML
from metalight.data import SinusoidDataModule, Task, TaskBatch
from metalight.lightning import NonFiniteError
from metalight.lightning.module import _all_finite
from metalight.models import MLP
from tests.reliability.test_bad_inputs import SignSGD, resume, trainer

SGD = functools.partial(torch.optim.SGD, lr=0.1)


class SqrtNet(nn.Module):
    """Finite outputs and loss at w = 0, but an infinite gradient: d sqrt(|w|) / dw."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.b = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w.abs().sqrt() + self.b


def tasks(n: int = 2) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        sx, qx = torch.rand(5, 1, generator=g), torch.rand(5, 1, generator=g)
        out.append(Task(sx, sx.sin(), qx, qx.sin(), torch.zeros(2)))
    return TaskBatch.stack(out)


def test_nonfinite_gradient_in_the_last_inner_step_names_the_parameter() -> None:
    module = MAML(SqrtNet(), inner_optim=SGD, inner_steps=1)
    with pytest.raises(NonFiniteError) as err:
        module.training_step(tasks(), 0)
    assert "inner step 0" in str(err.value) and "'w'" in str(err.value), str(err.value)


def test_nonfinite_evaluation_loss_is_not_recorded_silently() -> None:
    module = MAML(nn.Linear(1, 1), inner_optim=functools.partial(torch.optim.SGD, lr=1e30))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises((NonFiniteError, UserWarning)):
            module.validation_step(tasks(), 0)


def test_skip_policy_applies_to_evaluation() -> None:
    module = MAML(nn.Linear(1, 1), inner_optim=SGD, nan_policy="skip")
    batch = tasks()
    batch.support_y[1, 0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module.validation_step(batch, 0)
    counts = module._metrics.compute("val")
    assert (counts["val/episodes"], counts["val/diverged"]) == (1, 1)


def test_inner_optimizer_without_differentiable_version_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="no differentiable version of SignSGD"):
        MAML(MLP(hidden=(4,)), inner_optim=SignSGD)


def test_refused_checkpoint_leaves_the_module_untouched(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = MAML(MLP(hidden=(8,)), inner_steps=1)
    t = trainer(max_steps=2)
    t.fit(saved, datamodule=SinusoidDataModule(meta_batch_size=2, train_batches_per_epoch=5))
    t.save_checkpoint(tmp_path / "a.ckpt")
    module = MAML(MLP(hidden=(16,)), inner_steps=1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(RuntimeError, match="size mismatch"):
        resume(tmp_path / "a.ckpt", module)
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == []


def test_checkpoint_saved_after_fit_records_the_trained_position() -> None:
    module = MAML(MLP(hidden=(4,)), inner_steps=1)
    data = SinusoidDataModule(meta_batch_size=2, train_batches_per_epoch=5)
    t: L.Trainer = trainer(max_steps=3)
    t.fit(module, datamodule=data)
    assert t.global_step == 3
    assert data.state_dict() == {
        "epoch": 0,
        "next_batch": 3,
        "stream": {"seed": 0, "meta_batch_size": 2, "train_batches_per_epoch": 5},
    }


def test_finite_check_raises_no_false_alarm_near_the_dtype_maximum() -> None:
    # Summing entries to check them all at once turned 1000 finite values of 3e38 into Inf.
    big = torch.full((1000,), 3e38)
    assert _all_finite([big, None, torch.zeros(0)])
    assert not _all_finite([big, torch.tensor([1.0, float("nan")])])
    assert not _all_finite([torch.tensor([float("-inf")], dtype=torch.float64)])
