"""Hypergradients of every built-in meta-parameter kind against finite differences (float64).

Each case continues an inner training already under way (a carried-over optimizer state, as
in an online run), then differentiates the validation loss after ``K`` more inner steps with
respect to the meta-parameters, through the plain, the checkpointed and the truncated unroll.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from metalight.bilevel import BilevelModule, Distill, HyperLR, InnerBatch, Reweight, unroll
from metalight.optim.functional import sgd

K = 4  # inner steps
T = 2  # truncation
N_TRAIN = 12
N_IN, N_OUT = 4, 3

OPTIMIZERS = {
    "sgd_momentum": functools.partial(torch.optim.SGD, lr=0.3, momentum=0.9),
    "adam": functools.partial(torch.optim.Adam, lr=0.05),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    # Smooth activations: finite differences need a differentiable loss surface.
    return nn.Sequential(nn.Linear(N_IN, 5), nn.Tanh(), nn.Linear(5, N_OUT)).double()


class LearnedLoss(BilevelModule):
    """A user's own kind: a small network adds a learned term to the inner loss."""

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.loss_net = nn.Sequential(nn.Linear(N_OUT, 4), nn.Tanh(), nn.Linear(4, 1))

    def inner_loss(self, params: list[Tensor], batch: InnerBatch, step: int) -> Tensor:
        logits = self.predict(params, batch.x)
        learned = nn.functional.softplus(self.loss_net(logits.softmax(-1))).mean()
        return nn.functional.cross_entropy(logits, batch.y) + learned


def _make(kind: str, optimizer: str, **kwargs: Any) -> BilevelModule:
    common: dict[str, Any] = {"inner_optim": OPTIMIZERS[optimizer], "inner_steps": K, **kwargs}
    if kind == "hyper":
        module: BilevelModule = HyperLR(_model(), schedule=2, **common)
    elif kind == "reweight":
        module = Reweight(_model(), num_train=N_TRAIN, **common)
    elif kind == "distill":
        module = Distill(_model(), num_classes=N_OUT, per_class=2, input_shape=[N_IN], **common)
    else:
        module = LearnedLoss(_model(), **common)
    module.double()
    with torch.no_grad():
        # Away from the starting values, so that every term of the hypergradient matters.
        generator = torch.Generator().manual_seed(1)
        for _, p in module.named_meta_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


def _data() -> tuple[list[InnerBatch], Tensor, Tensor]:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(N_TRAIN, N_IN, generator=generator, dtype=torch.float64)
    y = torch.randint(0, N_OUT, (N_TRAIN,), generator=generator)
    batches = []
    for _ in range(K):
        index = torch.randperm(N_TRAIN, generator=generator)[:6]
        batches.append(InnerBatch(x[index], y[index], index))
    val_x = torch.randn(8, N_IN, generator=generator, dtype=torch.float64)
    val_y = torch.randint(0, N_OUT, (8,), generator=generator)
    return batches, val_x, val_y


def _carried_state(module: BilevelModule, batches: list[InnerBatch]) -> tuple[list[Tensor], Any]:
    """The inner training after one earlier outer step (non-empty optimizer state)."""
    params, state = module.current_inner()
    params, state, _ = module.unroll_inner(batches, params, state, truncate=0)
    return [p.detach() for p in params], state


def _outer(
    module: BilevelModule, start: tuple[list[Tensor], Any], **unroll_kwargs: Any
) -> Callable[..., Tensor]:
    batches, val_x, val_y = _data()

    def outer_loss(*meta: Tensor) -> Tensor:
        with module.bound_meta(meta):
            params, _, _ = module.unroll_inner(batches, *start, **unroll_kwargs)
            return module.outer_loss(params, val_x, val_y)

    return outer_loss


def _meta(module: BilevelModule) -> tuple[Tensor, ...]:
    return tuple(p.detach().clone().requires_grad_(True) for _, p in module.named_meta_parameters())


KINDS = ["hyper", "reweight", "distill", "learned_loss"]


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("kind", KINDS)
def test_hypergradient_equals_finite_differences(
    kind: str, checkpoint: bool, optimizer: str
) -> None:
    module = _make(kind, optimizer, checkpoint_unroll=checkpoint)
    start = _carried_state(module, _data()[0])
    assert any(isinstance(v, Tensor) for column in start[1] for v in column)
    fn = _outer(module, start)
    meta = _meta(module)
    assert torch.autograd.gradcheck(fn, meta, eps=1e-6, atol=1e-8, rtol=1e-6)
    grads = torch.autograd.grad(fn(*meta), meta)
    assert all(bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("kind", KINDS)
def test_truncated_hypergradient_is_the_gradient_of_the_last_steps(
    kind: str, checkpoint: bool
) -> None:
    # Truncated back-propagation through the last T of K steps is the exact derivative of
    # a function whose first K - T steps see the meta-parameters as constants.
    module = _make(kind, "sgd_momentum", checkpoint_unroll=checkpoint)
    batches, _, _ = _data()
    start = _carried_state(module, batches)
    meta = _meta(module)
    truncated = torch.autograd.grad(_outer(module, start, truncate=T)(*meta), meta)

    with torch.no_grad(), module.bound_meta([m.detach() for m in meta]):
        middle = module.unroll_inner(batches, *start, steps=K - T, truncate=0)[:2]
    last_steps = _outer(module, middle, steps=T, first_step=K - T, truncate=None)
    assert torch.autograd.gradcheck(last_steps, meta, eps=1e-6, atol=1e-8, rtol=1e-6)
    reference = torch.autograd.grad(last_steps(*meta), meta)
    for got, want in zip(truncated, reference):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)

    full = torch.autograd.grad(_outer(module, start, truncate=None)(*meta), meta)
    assert any(not torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(truncated, full))


@pytest.mark.parametrize("kind", KINDS)
def test_truncating_at_k_is_the_full_unroll(kind: str) -> None:
    module = _make(kind, "adam")
    start = _carried_state(module, _data()[0])
    meta = _meta(module)
    full = torch.autograd.grad(_outer(module, start, truncate=None)(*meta), meta)
    at_k = torch.autograd.grad(_outer(module, start, truncate=K)(*meta), meta)
    for a, b in zip(full, at_k):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_checkpointed_unroll_matches_the_plain_one(kind: str) -> None:
    start_module = _make(kind, "sgd_momentum")
    start = _carried_state(start_module, _data()[0])
    meta = _meta(start_module)
    plain = torch.autograd.grad(_outer(start_module, start)(*meta), meta)
    start_module.checkpoint_unroll = True
    recomputed = torch.autograd.grad(_outer(start_module, start)(*meta), meta)
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_engine_hypergradient_of_a_learning_rate_matches_the_closed_form() -> None:
    # One SGD step on (w - c)^2 / 2 from w0: w1 = w0 - lr (w0 - c); the outer loss
    # (w1 - c)^2 / 2 has d/dlr = -(w1 - c)(w0 - c).
    w0 = torch.tensor([2.0, -1.0], dtype=torch.float64)
    c = torch.tensor([0.5, 0.25], dtype=torch.float64)
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    result = unroll(
        sgd,
        [w0],
        sgd.init([w0]),
        lambda p, meta, step: 0.5 * ((p[0] - c) ** 2).sum(),
        lambda meta, step: [{"lr": meta[0]}],
        1,
        meta=[lr],
    )
    outer = 0.5 * ((result.params[0] - c) ** 2).sum()
    (got,) = torch.autograd.grad(outer, lr)
    w1 = w0 - 0.3 * (w0 - c)
    assert torch.allclose(got, -((w1 - c) * (w0 - c)).sum(), rtol=1e-15, atol=0)
