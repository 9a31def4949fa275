"""The meta-step's agreement helpers on one process: the surrogate applies exactly the
meta-gradient it is given, and unused parameters keep no gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metalight.lightning.distributed import (
    global_counts,
    merge_used,
    meta_gradient_surrogate,
    on_any_rank,
    raise_on_any_rank,
    used_on_any_rank,
)
from metalight.lightning.finite import NonFiniteError

CPU = torch.device("cpu")


def test_surrogate_applies_the_given_meta_gradient_exactly() -> None:
    torch.manual_seed(0)
    used = nn.Parameter(torch.randn(3, dtype=torch.float64))
    unused = nn.Parameter(torch.randn(2, dtype=torch.float64))
    grad = torch.randn(3, dtype=torch.float64)
    loss = meta_gradient_surrogate([used, unused], [grad, None], torch.tensor(2.5))
    assert loss.item() == 2.5
    loss.backward()
    assert torch.equal(used.grad, grad)
    assert unused.grad is None  # torch.optim then skips it, as in plain torch


def test_under_ddp_every_parameter_takes_part_with_a_zero() -> None:
    used = nn.Parameter(torch.ones(2, dtype=torch.float64))
    unused = nn.Parameter(torch.ones(2, dtype=torch.float64))
    loss = meta_gradient_surrogate(
        [used, unused],
        [torch.full((2,), 3.0, dtype=torch.float64), None],
        torch.tensor(1.0),
        distributed=True,
    )
    loss.backward()
    assert torch.equal(used.grad, torch.full((2,), 3.0, dtype=torch.float64))
    assert torch.equal(unused.grad, torch.zeros(2, dtype=torch.float64))


def test_nothing_to_learn_gives_a_differentiable_zero_surrogate() -> None:
    weight = nn.Parameter(torch.ones(2))
    loss = meta_gradient_surrogate([weight], [None], torch.tensor(4.0))
    assert loss.item() == 4.0 and loss.requires_grad
    loss.backward()
    assert weight.grad is None


def test_one_process_answers_from_its_own_values() -> None:
    assert on_any_rank(None, True, CPU) and not on_any_rank(None, False, CPU)
    assert global_counts(None, 2, 5, CPU) == (2, 5)
    assert merge_used(None, [torch.ones(1), None]) == [True, False]
    assert merge_used([False, True, False], [torch.ones(1), None, None]) == [True, True, False]
    assert used_on_any_rank(None, [True, False], CPU) == [True, False]
    raise_on_any_rank(None, None, 3, CPU)
    with pytest.raises(NonFiniteError, match=r"^task 1: bad$"):
        raise_on_any_rank(None, NonFiniteError("task 1: bad"), 3, CPU)
