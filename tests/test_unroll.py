"""Unroll policies through the higher-style API: ``innerloop_ctx(truncate=, checkpoint=)``."""

from __future__ import annotations

import copy
import gc
import weakref
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import metalight
from metalight.optim import DifferentiableAdam, DifferentiableOptimizer, DifferentiableSGD, registry
from metalight.optim.unroll import run_unroll


@pytest.fixture(autouse=True)
def _restore_optimizer_registry() -> Iterator[None]:
    """Registrations made by a test do not leak into the next one."""
    saved = registry.registered_optimizers()
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


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


def make_stateful_model(seed: int) -> nn.Module:
    """Buffers that every forward pass in train mode moves: BatchNorm running statistics and
    spectral norm's power-iteration vectors (which also change the output)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.utils.parametrizations.spectral_norm(nn.Linear(2, 8)),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.BatchNorm1d(8),
        nn.Tanh(),
        nn.Linear(8, 1),
    ).double()


def unroll_with_buffers(
    model: nn.Module, steps: int, checkpoint: bool
) -> tuple[list[Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Meta-gradients, the view's buffers after the forward passes, and after backward."""
    xs, ys, xq, yq = make_data(5)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    ctx = metalight.innerloop_ctx(model, opt, copy_initial_weights=False, checkpoint=checkpoint)
    with ctx as (fmodel, diffopt):
        diffopt.unroll(lambda params: F.mse_loss(fmodel(xs, params=params), ys), steps)
        meta = F.mse_loss(fmodel(xq), yq)
        forward = {n: b.clone() for n, b in fmodel.named_buffers()}
        meta.backward()
        after = {n: b.clone() for n, b in fmodel.named_buffers()}
    return [p.grad.clone() for p in model.parameters()], forward, after


def test_checkpointed_unroll_recomputes_on_the_buffers_each_step_saw() -> None:
    model = make_stateful_model(6)
    want, want_forward, want_after = unroll_with_buffers(copy.deepcopy(model), 4, False)
    got, forward, after = unroll_with_buffers(copy.deepcopy(model), 4, True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # The buffers moved at every forward pass (5 of them), the recomputations moved none.
    assert want_forward["3.num_batches_tracked"].item() == 5
    for name in want_forward:
        assert torch.equal(forward[name], want_forward[name]), name
        assert torch.equal(after[name], forward[name]), f"{name} moved in backward"
        assert torch.equal(want_after[name], want_forward[name]), name


def test_checkpointed_unroll_recomputes_in_the_modes_each_step_ran_in() -> None:
    model = make_stateful_model(9)

    def meta_grads(checkpoint: bool) -> list[Tensor]:
        twin = copy.deepcopy(model)
        xs, ys, xq, yq = make_data(9)
        opt = torch.optim.SGD(twin.parameters(), lr=0.1)
        ctx = metalight.innerloop_ctx(twin, opt, copy_initial_weights=False, checkpoint=checkpoint)
        with ctx as (fmodel, diffopt):
            diffopt.unroll(lambda params: F.mse_loss(fmodel(xs, params=params), ys), 3)
            fmodel.eval()  # the query in eval mode; the inner steps ran in train mode
            F.mse_loss(fmodel(xq), yq).backward()
            assert not fmodel.training
        return [p.grad for p in twin.parameters()]

    for a, b in zip(meta_grads(True), meta_grads(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_checkpointed_unroll_recomputes_with_the_dropout_masks_of_the_forward_pass() -> None:
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 1)).double()

    def meta_grads(checkpoint: bool) -> tuple[list[Tensor], Tensor]:
        twin = copy.deepcopy(model)
        xs, ys, xq, yq = make_data(10)
        opt = torch.optim.SGD(twin.parameters(), lr=0.1)
        torch.manual_seed(11)
        ctx = metalight.innerloop_ctx(twin, opt, copy_initial_weights=False, checkpoint=checkpoint)
        with ctx as (fmodel, diffopt):
            diffopt.unroll(lambda params: F.mse_loss(fmodel(xs, params=params), ys), 3)
            F.mse_loss(fmodel(xq), yq).backward()
        # The user's random stream goes on as if no step had been recomputed.
        return [p.grad for p in twin.parameters()], torch.rand(3)

    (got, got_next), (want, want_next) = meta_grads(True), meta_grads(False)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.equal(got_next, want_next)


def test_checkpointed_unroll_leaves_a_frozen_parameter_alone() -> None:
    model = make_model(7)
    model[2].weight.requires_grad_(False)
    frozen = model[2].weight.detach().clone()
    xs, ys, _, _ = make_data(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctx = metalight.innerloop_ctx(model, opt, copy_initial_weights=False, checkpoint=True)
    with ctx as (fmodel, diffopt):
        diffopt.unroll(lambda params: F.mse_loss(fmodel(xs, params=params), ys), 4)
        for t in range(5):
            weight = list(fmodel.parameters(time=t))[2]
            assert not weight.requires_grad, f"frozen weight requires grad at step {t}"
            assert torch.equal(weight, frozen), f"frozen weight moved at step {t}"


def test_checkpointed_unroll_frees_the_view_after_backward() -> None:
    model = make_stateful_model(8)
    xs, ys, xq, yq = make_data(8)

    def meta_loss() -> tuple[Tensor, weakref.ref]:
        # As in MetaLearningModule: the view is local, only the meta-loss leaves.
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ctx = metalight.innerloop_ctx(model, opt, copy_initial_weights=False, checkpoint=True)
        with ctx as (fmodel, diffopt):
            diffopt.unroll(lambda params: F.mse_loss(fmodel(xs, params=params), ys), 4)
            return F.mse_loss(fmodel(xq), yq), weakref.ref(fmodel.fast_params[0])

    loss, weight = meta_loss()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    loss.backward()  # a retained graph can be backpropagated again
    for p, g in zip(model.parameters(), first, strict=True):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-12, atol=0)
    del loss
    gc.collect()
    # Each recomputed step's closure reaches the view, whose history holds the step's
    # outputs: a cycle through autograd's graph that only backward can break.
    assert weight() is None, "the view and its fast weights outlived the meta-loss"


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


class CountingAdam(DifferentiableAdam):
    """The built-in Adam, counting how often its state is written into higher's dicts."""

    writes = 0

    def _write_dicts(self, states: object) -> None:
        type(self).writes += 1
        super()._write_dicts(states)  # type: ignore[arg-type]


class AdamForCounting(torch.optim.Adam):
    pass


@pytest.mark.parametrize("how", ["step", "unroll", "checkpoint", "truncate"])
def test_optimizer_state_is_stored_once_and_matches_torch_optim(how: str) -> None:
    metalight.register_optim(AdamForCounting, CountingAdam)
    CountingAdam.writes = 0
    model = make_model(5)
    ref = copy.deepcopy(model)
    xs, ys, _, _ = make_data(5)
    opt = AdamForCounting(model.parameters(), lr=0.03, foreach=False)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.03, foreach=False)
    policy = {"checkpoint": {"checkpoint": True}, "truncate": {"truncate": 2}}.get(how, {})
    with metalight.innerloop_ctx(model, opt, **policy) as (fmodel, diffopt):
        if how == "step":
            for _ in range(4):
                diffopt.step(F.mse_loss(fmodel(xs), ys))
        else:
            diffopt.unroll(lambda params: F.mse_loss(fmodel(xs, params=params), ys), 4)
        assert CountingAdam.writes == 0
        for _ in range(4):
            ref_opt.zero_grad()
            F.mse_loss(ref(xs), ys).backward()
            ref_opt.step()
        for i, p in enumerate(ref.parameters()):
            got, want = diffopt.state[0][i], ref_opt.state[p]
            assert got["step"] == 4
            torch.testing.assert_close(got["exp_avg"], want["exp_avg"], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(got["exp_avg_sq"], want["exp_avg_sq"])
        assert CountingAdam.writes == 1
        # The groups hold the latest fast weights, as higher's do.
        assert all(a is b for a, b in zip(diffopt.param_groups[0]["params"], fmodel.fast_params))
        # Stepping on after the state was read continues from it.
        if how == "step":
            diffopt.step(F.mse_loss(fmodel(xs), ys))
        else:
            diffopt.unroll(lambda params: F.mse_loss(fmodel(xs, params=params), ys), 1)
        ref_opt.zero_grad()
        F.mse_loss(ref(xs), ys).backward()
        ref_opt.step()
        for a, b in zip(fmodel.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert diffopt.state[0][0]["step"] == 5


class LoggedSGD(DifferentiableSGD):
    """A built-in extended through higher's protocol: its _update must run at every step."""

    calls = 0

    def _update(self, grouped_grads: list, **kwargs: object) -> None:  # type: ignore[override]
        type(self).calls += 1
        super()._update(grouped_grads, **kwargs)


class SGDForLogging(torch.optim.SGD):
    pass


def test_a_built_in_subclass_with_its_own_update_keeps_the_protocol() -> None:
    metalight.register_optim(SGDForLogging, LoggedSGD)
    LoggedSGD.calls = 0
    model = make_model(6)
    xs, ys, xq, yq = make_data(6)
    opt = SGDForLogging(model.parameters(), lr=0.1, momentum=0.9)
    ctx = metalight.innerloop_ctx(model, opt, copy_initial_weights=False)
    with ctx as (fmodel, diffopt):
        assert not diffopt.supports_pure_step
        diffopt.step(F.mse_loss(fmodel(xs), ys))
        diffopt.unroll(lambda params: F.mse_loss(fmodel(xs, params=params), ys), 2)
        F.mse_loss(fmodel(xq), yq).backward()
    assert LoggedSGD.calls == 3
    got = [p.grad.clone() for p in model.parameters()]
    # The reference: hand-written SGD with momentum, second order throughout.
    params, bufs = list(model.parameters()), []
    names = [n for n, _ in model.named_parameters()]
    for step in range(3):
        out = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (xs,))
        grads = torch.autograd.grad(F.mse_loss(out, ys), params, create_graph=True)
        bufs = list(grads) if step == 0 else [0.9 * b + g for b, g in zip(bufs, grads)]
        params = [p - 0.1 * b for p, b in zip(params, bufs, strict=True)]
    out = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (xq,))
    want = torch.autograd.grad(F.mse_loss(out, yq), list(model.parameters()))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with (
        pytest.raises(TypeError, match="checkpoint=True needs a built-in"),
        metalight.innerloop_ctx(model, opt, checkpoint=True),
    ):
        pass


@pytest.mark.parametrize("name", ["sgd", "custom"])
def test_first_order_is_an_argument_of_the_step_not_a_toggled_attribute(name: str) -> None:
    if name == "custom":

        class PlainSGD(torch.optim.SGD):
            pass

        metalight.register_optim(PlainSGD, InPlaceSGD)
        factory = PlainSGD
    else:
        factory = torch.optim.SGD
    model = make_model(7)
    xs, ys, xq, yq = make_data(7)
    fmodel = metalight.monkeypatch(model, copy_initial_weights=False)
    opt = factory(model.parameters(), lr=0.1)
    diffopt = metalight.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
    run_unroll(
        fmodel,
        diffopt,
        lambda params: F.mse_loss(fmodel(xs, params=params), ys),
        3,
        metalight.UnrollPolicy(first_order=True),
    )
    assert diffopt.first_order is False
    F.mse_loss(fmodel(xq), yq).backward()
    got = [p.grad.clone() for p in model.parameters()]
    # First-order MAML by hand: gradients as constants, identity Jacobians through updates.
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    for _ in range(3):
        out = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (xs,))
        grads = torch.autograd.grad(F.mse_loss(out, ys), params)
        params = [p - 0.1 * g for p, g in zip(params, grads, strict=True)]
    out = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (xq,))
    want = torch.autograd.grad(F.mse_loss(out, yq), list(model.parameters()))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # The one-step form takes it per call as well.
    loss = F.mse_loss(fmodel(xs), ys)
    new = diffopt.inner_step(loss, first_order=True)
    assert diffopt.first_order is False and all(p.requires_grad for p in new)


def test_public_step_names_and_their_old_aliases() -> None:
    model = make_model(8)
    xs, ys, _, _ = make_data(8)
    clip = lambda grads: [g.clamp(-1e-3, 1e-3) for g in grads]  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with metalight.innerloop_ctx(model, opt, grad_callback=clip) as (fmodel, diffopt):
        assert diffopt.grad_callback is clip and diffopt._grad_callback is clip
        diffopt.apply_override({"lr": 0.5})
        assert diffopt.param_groups[0]["lr"] == 0.5
        diffopt._apply_override({"lr": [0.25]})
        assert diffopt.param_groups[0]["lr"] == 0.25
        before = [p.detach().clone() for p in fmodel.parameters()]
        diffopt._step(F.mse_loss(fmodel(xs), ys))
        for a, b in zip(fmodel.parameters(), before, strict=True):
            assert 0 < (a - b).abs().max() <= 0.25 * 1e-3 + 1e-15
        diffopt.grad_callback = None
        assert diffopt._grad_callback is None
