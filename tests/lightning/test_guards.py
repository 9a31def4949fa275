"""The NaN-policy guard of a real meta-step: each check fires with its own message."""

from __future__ import annotations

import functools
import re

import pytest
import torch

from metalight.algorithms import MAML
from metalight.data.task import Task, TaskBatch
from metalight.lightning import NonFiniteError
from metalight.lightning.finite import FiniteChecks
from metalight.models import MLP


def sinusoid_batch() -> TaskBatch:
    x = torch.linspace(-1, 1, 6, dtype=torch.float64).unsqueeze(-1)
    task = Task(x, torch.sin(x), x, torch.cos(x), torch.zeros(2))
    return TaskBatch.stack([task])


def maml(lr: float) -> MAML:
    torch.manual_seed(0)
    model = MLP(hidden=(4,)).double()
    return MAML(model, inner_optim=functools.partial(torch.optim.SGD, lr=lr), vectorize_tasks=False)


def test_fast_weights_that_go_bad_in_the_last_step_are_named() -> None:
    # The inner loss of the only step is finite; an infinite rate makes the weights after it
    # non-finite, which only the final-weights check sees.
    module = maml(float("inf"))
    want = (
        "task 0 of batch 3: non-finite fast weights in 'features.0.weight', "
        "'features.0.bias', 'head.weight', 'head.bias' after inner step 0 (an infinite "
        "gradient or a too large inner learning rate; lower the rate or clip gradients with "
        "grad_callback)"
    )
    with pytest.raises(NonFiniteError, match=f"^{re.escape(want)}$"):
        module.training_step(sinusoid_batch(), 3)


def test_a_finite_step_passes_every_check() -> None:
    module = maml(0.1)
    loss = module.training_step(sinusoid_batch(), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def test_query_loss_and_meta_gradient_checks_say_what_went_bad() -> None:
    checks = FiniteChecks()
    with pytest.raises(NonFiniteError, match=r"^non-finite query loss nan after 5 inner steps$"):
        checks.expect_query_loss(torch.tensor(float("nan")), 5)
    with pytest.raises(NonFiniteError, match=r"^non-finite meta-gradient$"):
        checks.expect_meta_gradient([torch.ones(2), None, torch.tensor([float("inf")])])
    checks.expect_meta_gradient([torch.ones(2), None])
    checks.expect_query_loss(torch.tensor(0.5), 1)
