"""Unroll policies through the higher-style API: ``innerloop_ctx(truncate=, checkpoint=)``."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import metalight
from metalight.optim import DifferentiableOptimizer


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(2, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.BatchNorm1d(8, track_running_stats=False),
        nn.Tanh(),
        nn.Linear(8, 1),
    ).double()


def make_data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(10, 2, generator=g).double(), torch.randn(12, 2, generator=g).double()
    return xs, xs.sum(1, keepdim=True).sin(), xq, xq.sum(1, keepdim=True).sin()


def meta_grads_with_step(model: nn.Module, opt_factory, steps: int) -> list[Tensor]:
    """The reference: ``steps`` calls of ``diffopt.step`` (the plain unroll)."""
    xs, ys, xq, yq = make_data()
    opt = opt_factory(model.parameters())
    with metalight.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(F.mse_loss(fmodel(xs), ys))
        F.mse_loss(fmodel(xq), yq).backward()
    return [p.grad.clone() for p in model.parameters()]


def meta_grads_with_unroll(model: nn.Module, opt_factory, steps: int, **policy) -> list[Tensor]:
    xs, ys, xq, yq = make_data()
    opt = opt_factory(model.parameters())
    ctx = metalight.innerloop_ctx(model, opt, copy_initial_weights=False, **policy)
    with ctx as (fmodel, diffopt):
        final = diffopt.unroll(lambda params: F.mse_loss(fmodel(xs, params=params), ys), steps)
        assert all(a is b for a, b in zip(final, fmodel.fast_params, strict=True))
        F.mse_loss(fmodel(xq), yq).backward()
    return [p.grad.clone() for p in model.parameters()]


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda params: torch.optim.Adam(params, lr=0.03),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("steps", [1, 5])
def test_checkpointed_unroll_equals_the_plain_unroll(name: str, steps: int) -> None:
    model = make_model(1)
    want = meta_grads_with_step(copy.deepcopy(model), OPTIMIZERS[name], steps)
    got = meta_grads_with_unroll(copy.deepcopy(model), OPTIMIZERS[name], steps, checkpoint=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # Without a policy, unroll() is the same loop as step().
    plain = meta_grads_with_unroll(copy.deepcopy(model), OPTIMIZERS[name], steps)
    for a, b in zip(plain, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def hand_truncated_momentum(model: nn.Module, steps: int, truncate: int) -> list[Tensor]:
    """SGD with momentum, written out: first-order before the last ``truncate`` steps."""
    xs, ys, xq, yq = make_data()
    lr, momentum = 0.1, 0.9
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    bufs: list[Tensor | None] = [None] * len(params)
    for step in range(steps):
        second_order = step >= steps - truncate
        out = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (xs,))
        grads = torch.autograd.grad(F.mse_loss(out, ys), params, create_graph=second_order)
        new = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            bufs[i] = g if bufs[i] is None else momentum * bufs[i] + g
            new.append(p - lr * bufs[i])
        params = new
    out = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (xq,))
    return list(torch.autograd.grad(F.mse_loss(out, yq), list(model.parameters())))


@pytest.mark.parametrize("checkpoint", [False, True])
def test_truncated_unroll_matches_a_hand_written_one(checkpoint: bool) -> None:
    model = make_model(2)
    want = hand_truncated_momentum(copy.deepcopy(model), steps=6, truncate=2)
    got = meta_grads_with_unroll(
        copy.deepcopy(model),
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        6,
        truncate=2,
        checkpoint=checkpoint,
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    full = meta_grads_with_step(
        copy.deepcopy(model), lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9), 6
    )
    assert any(not torch.allclose(a, b) for a, b in zip(got, full, strict=True))


def test_checkpointed_meta_gradient_passes_gradcheck() -> None:
    model = make_model(3)
    xs, ys, xq, yq = make_data(3)
    names = [n for n, _ in model.named_parameters()]

    def meta_loss(*initial: Tensor) -> Tensor:
        # The model's parameters are swapped for the checked inputs, so the loss is a
        # function of them; the meta-gradient w.r.t. them goes through the checkpointed steps.
        fmodel = metalight.monkeypatch(model)
        fmodel.update_params(list(initial))
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        diffopt = metalight.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
        diffopt.unroll_policy = metalight.UnrollPolicy(checkpoint=True)
        diffopt.unroll(lambda params: F.mse_loss(fmodel(xs, params=params), ys), 3)
        return F.mse_loss(fmodel(xq), yq)

    inputs = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    assert len(inputs) == len(names)
    assert torch.autograd.gradcheck(meta_loss, inputs)


def saved_bytes(model: nn.Module, steps: int, **policy) -> int:
    """Bytes of distinct tensors that the graph still keeps for backward after the unroll."""
    saved: list[tuple[weakref.ref, int, int]] = []

    def pack(t: Tensor) -> Tensor:
        # Graphs that lived only inside a step (first-order gradients) are freed by now:
        # only tensors still referenced at the end count.
        saved.append((weakref.ref(t), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t

    torch.manual_seed(0)
    xs, ys = torch.randn(256, 2, dtype=torch.float64), torch.randn(256, 1, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ctx = metalight.innerloop_ctx(model, opt, copy_initial_weights=False, **policy)
    with ctx as (fmodel, diffopt), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        diffopt.unroll(lambda params: F.mse_loss(fmodel(xs, params=params), ys), steps)
        gc.collect()
        alive = {(ptr, size): size for ref, ptr, size in saved if ref() is not None}
        return sum(alive.values())


def test_checkpointed_unroll_keeps_fast_weights_not_activations() -> None:
    model = make_model(4)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    plain = [saved_bytes(model, k) for k in (10, 20)]
    ckpt = [saved_bytes(model, k, checkpoint=True) for k in (10, 20)]
    # A plain step keeps activations of a 256-point batch (several times the weights).
    assert plain[1] - plain[0] > 10 * 10 * params
    # A checkpointed step keeps its inputs: the fast weights, about one copy per step.
    assert ckpt[1] - ckpt[0] <= 10 * 1.5 * params
    assert ckpt[1] < plain[1] / 3


def test_step_refuses_a_policy_it_cannot_apply() -> None:
    model = make_model()
    xs, ys, _, _ = make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for policy in ({"truncate": 3}, {"checkpoint": True}):
        with (
            metalight.innerloop_ctx(model, opt, **policy) as (fmodel, diffopt),
            pytest.raises(RuntimeError, match=r"diffopt\.unroll\(loss_fn, steps\)"),
        ):
            diffopt.step(F.mse_loss(fmodel(xs), ys))
    with (
        metalight.innerloop_ctx(model, opt) as (fmodel, diffopt),
        pytest.raises(ValueError, match="steps must be an integer >= 0"),
    ):
        diffopt.unroll(lambda params: F.mse_loss(fmodel(xs, params=params), ys), -1)


class InPlaceSGD(DifferentiableOptimizer):
    def _update(self, grouped_grads: list, **kwargs: object) -> None:  # type: ignore[override]
        for group, grads in zip(self.param_groups, grouped_grads, strict=True):
            for i, (p, g) in enumerate(zip(group["params"], grads, strict=True)):
                group["params"][i] = p - group["lr"] * g


def test_checkpoint_needs_a_functional_core_optimizer() -> None:
    class PlainSGD(torch.optim.SGD):
        pass

    metalight.register_optim(PlainSGD, InPlaceSGD)
    model = make_model()
    opt = PlainSGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(TypeError, match="checkpoint=True needs a built-in"),
        metalight.innerloop_ctx(model, opt, checkpoint=True),
    ):
        pass
    # Truncation works with any optimizer.
    xs, ys, xq, yq = make_data()
    ctx = metalight.innerloop_ctx(model, opt, copy_initial_weights=False, truncate=1)
    with ctx as (fmodel, diffopt):
        diffopt.unroll(lambda params: F.mse_loss(fmodel(xs, params=params), ys), 3)
        F.mse_loss(fmodel(xq), yq).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_test_mode_unroll_keeps_no_graph() -> None:
    model = make_model()
    xs, ys, _, _ = make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = metalight.innerloop_ctx(model, opt, track_higher_grads=False, checkpoint=True)
    with ctx as (fmodel, diffopt):
        final = diffopt.unroll(lambda params: F.mse_loss(fmodel(xs, params=params), ys), 3)
    assert all(p.grad_fn is None for p in final)
