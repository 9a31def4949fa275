"""Meta-gradients of MetaLearningModule and each algorithm equal hand-written references.

Everything in float64. The module's ``training_step`` returns a surrogate whose backward
leaves the meta-gradient in ``.grad``; the references are plain ``torch.func`` loops.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalight.algorithms import ANIL, FOMAML, IMAML, MAML, MetaSGD, Reptile
from metalight.data.task import Task, TaskBatch
from metalight.lightning import MetaLearningModule, NonFiniteError


class Net(nn.Module):
    def __init__(self, out: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def regression_batch(n_tasks: int = 3, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n_tasks):
        amp, phase = torch.rand(2, generator=g, dtype=torch.float64) * 2 + 0.5
        sx = torch.rand(5, 1, generator=g, dtype=torch.float64) * 4 - 2
        qx = torch.rand(7, 1, generator=g, dtype=torch.float64) * 4 - 2
        tasks.append(
            Task(
                sx,
                amp * torch.sin(sx + phase),
                qx,
                amp * torch.sin(qx + phase),
                torch.stack([amp, phase]),
            )
        )
    return TaskBatch.stack(tasks)


def module_grads(module: MetaLearningModule, batch: TaskBatch) -> list[torch.Tensor]:
    module.zero_grad(set_to_none=True)
    module.training_step(batch, 0).backward()
    return [p.grad for p in module.meta_parameters()]


def fcall(model: nn.Module, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    return functional_call(model, dict(zip(names, params)), (x,))


def reference_maml(
    model: nn.Module,
    batch: TaskBatch,
    lr: float,
    steps: int,
    first_order: bool = False,
    multi_step: bool = False,
) -> list[torch.Tensor]:
    init = list(model.parameters())
    total = [torch.zeros_like(p) for p in init]
    for task in batch:
        params = init
        losses = []
        for k in range(steps):
            loss = F.mse_loss(fcall(model, params, task.support_x), task.support_y)
            grads = torch.autograd.grad(loss, params, create_graph=not first_order)
            params = [p - lr * g for p, g in zip(params, grads)]
            if multi_step and k < steps - 1:
                losses.append(F.mse_loss(fcall(model, params, task.query_x), task.query_y))
        losses.append(F.mse_loss(fcall(model, params, task.query_x), task.query_y))
        meta = torch.stack(losses).mean() / len(batch)
        for t, g in zip(total, torch.autograd.grad(meta, init)):
            t += g
    return total


@pytest.fixture(params=[False, True], ids=["loop", "vectorized"])
def vectorize(request: pytest.FixtureRequest) -> bool:
    """Both training paths must give the hand-written meta-gradient."""
    return request.param


def sgd(lr: float) -> functools.partial:
    return functools.partial(torch.optim.SGD, lr=lr)


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_meta_gradient_equals_hand_written_loop(steps: int, vectorize: bool) -> None:
    torch.manual_seed(0)
    model = Net().double()
    module = MAML(
        copy.deepcopy(model), vectorize_tasks=vectorize, inner_optim=sgd(0.1), inner_steps=steps
    )
    batch = regression_batch()
    for got, want in zip(module_grads(module, batch), reference_maml(model, batch, 0.1, steps)):
        torch.testing.assert_close(got, want)


def test_fomaml_meta_gradient(vectorize: bool) -> None:
    torch.manual_seed(1)
    model = Net().double()
    module = FOMAML(
        copy.deepcopy(model), vectorize_tasks=vectorize, inner_optim=sgd(0.1), inner_steps=3
    )
    batch = regression_batch(seed=1)
    want = reference_maml(model, batch, 0.1, 3, first_order=True)
    for got, w in zip(module_grads(module, batch), want):
        torch.testing.assert_close(got, w)
    # ... and it truly differs from second order.
    full = reference_maml(model, batch, 0.1, 3)
    assert not all(torch.allclose(a, b) for a, b in zip(want, full))


def test_truncated_unroll_interpolates_first_and_second_order(vectorize: bool) -> None:
    torch.manual_seed(2)
    model = Net().double()
    batch = regression_batch(seed=2)
    full = MAML(
        copy.deepcopy(model),
        vectorize_tasks=vectorize,
        inner_optim=sgd(0.1),
        inner_steps=3,
        truncate=3,
    )
    fo = MAML(
        copy.deepcopy(model),
        vectorize_tasks=vectorize,
        inner_optim=sgd(0.1),
        inner_steps=3,
        truncate=0,
    )
    for got, want in zip(module_grads(full, batch), reference_maml(model, batch, 0.1, 3)):
        torch.testing.assert_close(got, want)
    want_fo = reference_maml(model, batch, 0.1, 3, first_order=True)
    for got, want in zip(module_grads(fo, batch), want_fo):
        torch.testing.assert_close(got, want)
    # truncate=1: steps 0 and 1 first-order, step 2 second-order, by hand.
    init = list(model.parameters())
    total = [torch.zeros_like(p) for p in init]
    for task in batch:
        params = init
        for k in range(3):
            loss = F.mse_loss(fcall(model, params, task.support_x), task.support_y)
            grads = torch.autograd.grad(loss, params, create_graph=k == 2)
            params = [p - 0.1 * g for p, g in zip(params, grads)]
        meta = F.mse_loss(fcall(model, params, task.query_x), task.query_y) / len(batch)
        for t, g in zip(total, torch.autograd.grad(meta, init)):
            t += g
    one = MAML(
        copy.deepcopy(model),
        vectorize_tasks=vectorize,
        inner_optim=sgd(0.1),
        inner_steps=3,
        truncate=1,
    )
    for got, want in zip(module_grads(one, batch), total):
        torch.testing.assert_close(got, want)


def test_multi_step_loss(vectorize: bool) -> None:
    torch.manual_seed(3)
    model = Net().double()
    module = MAML(
        copy.deepcopy(model),
        vectorize_tasks=vectorize,
        inner_optim=sgd(0.05),
        inner_steps=3,
        multi_step_loss=True,
    )
    batch = regression_batch(seed=3)
    want = reference_maml(model, batch, 0.05, 3, multi_step=True)
    for got, w in zip(module_grads(module, batch), want):
        torch.testing.assert_close(got, w)


def test_anil_adapts_head_only_and_runs_body_once(vectorize: bool) -> None:
    torch.manual_seed(4)
    model = Net().double()
    module = ANIL(
        copy.deepcopy(model), vectorize_tasks=vectorize, inner_optim=sgd(0.1), inner_steps=3
    )
    calls = []
    module.model.features.register_forward_hook(lambda *args: calls.append(1))
    batch = regression_batch(seed=4)
    got = module_grads(module, batch)
    if vectorize:
        # One vmap-ed call per inner step and one for the query, for all tasks at once.
        assert len(calls) == 3 + 1
    else:
        # Body once on support and once on query per task, whatever the number of steps.
        assert len(calls) == 2 * len(batch)
    body, head = model.features, model.head
    head_names = [n for n, _ in head.named_parameters()]
    init = list(model.parameters())
    total = [torch.zeros_like(p) for p in init]
    for task in batch:
        fs, fq = body(task.support_x), body(task.query_x)
        params = list(head.parameters())
        for _ in range(3):
            out = functional_call(head, dict(zip(head_names, params)), (fs,))
            grads = torch.autograd.grad(F.mse_loss(out, task.support_y), params, create_graph=True)
            params = [p - 0.1 * g for p, g in zip(params, grads)]
        out = functional_call(head, dict(zip(head_names, params)), (fq,))
        meta = F.mse_loss(out, task.query_y) / len(batch)
        for t, g in zip(total, torch.autograd.grad(meta, init)):
            t += g
    for a, b in zip(got, total):
        torch.testing.assert_close(a, b)


def test_meta_sgd_learns_per_parameter_rates(vectorize: bool) -> None:
    torch.manual_seed(5)
    model = Net().double()
    module = MetaSGD(copy.deepcopy(model), vectorize_tasks=vectorize, inner_lr=0.1, inner_steps=2)
    batch = regression_batch(seed=5)
    got = module_grads(module, batch)
    init = list(model.parameters())
    alphas = [torch.full_like(p, 0.1, requires_grad=True) for p in init]
    total = [torch.zeros_like(p) for p in init + alphas]
    for task in batch:
        params = init
        for _ in range(2):
            loss = F.mse_loss(fcall(model, params, task.support_x), task.support_y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            params = [p - a * g for p, a, g in zip(params, alphas, grads)]
        meta = F.mse_loss(fcall(model, params, task.query_x), task.query_y) / len(batch)
        for t, g in zip(total, torch.autograd.grad(meta, init + alphas)):
            t += g
    assert len(got) == len(total)
    for a, b in zip(got, total):
        torch.testing.assert_close(a, b)


def test_reptile_meta_gradient_is_weight_difference(vectorize: bool) -> None:
    torch.manual_seed(6)
    model = Net().double()
    module = Reptile(
        copy.deepcopy(model), vectorize_tasks=vectorize, inner_optim=sgd(0.1), inner_steps=4
    )
    assert module._use_vectorized() is vectorize
    batch = regression_batch(seed=6)
    got = module_grads(module, batch)
    total = [torch.zeros_like(p) for p in model.parameters()]
    for task in batch:
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        for _ in range(4):
            loss = F.mse_loss(fcall(model, params, task.support_x), task.support_y)
            grads = torch.autograd.grad(loss, params)
            params = [(p - 0.1 * g).detach().requires_grad_() for p, g in zip(params, grads)]
        for t, p0, p in zip(total, model.parameters(), params):
            t += (p0 - p).detach() / len(batch)
    for a, b in zip(got, total):
        torch.testing.assert_close(a, b)


def test_imaml_implicit_gradient_equals_exact_linear_solve() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    lam = 2.0
    n_params = sum(p.numel() for p in model.parameters())
    module = IMAML(
        copy.deepcopy(model),
        reg_lambda=lam,
        cg_steps=n_params + 5,
        inner_optim=sgd(0.05),
        inner_steps=30,
    )
    batch = regression_batch(2, seed=7)
    got = torch.cat([g.reshape(-1) for g in module_grads(module, batch)])
    want = torch.zeros(n_params, dtype=torch.float64)
    for task in batch:
        phi = [p.detach() for p in module.adapt_proximal(task)]
        flat = torch.cat([p.reshape(-1) for p in phi]).requires_grad_()

        def unflat(v: torch.Tensor, phi: list[torch.Tensor] = phi) -> list[torch.Tensor]:
            out, i = [], 0
            for p in phi:
                out.append(v[i : i + p.numel()].view_as(p))
                i += p.numel()
            return out

        def support(v: torch.Tensor, task: Task = task) -> torch.Tensor:
            return F.mse_loss(fcall(model, unflat(v), task.support_x), task.support_y)

        hessian = torch.autograd.functional.hessian(support, flat.detach())
        query = F.mse_loss(fcall(model, unflat(flat), task.query_x), task.query_y)
        g = torch.autograd.grad(query, flat)[0]
        system = torch.eye(n_params, dtype=torch.float64) + hessian / lam
        want += torch.linalg.solve(system, g) / len(batch)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def reference_learned_rates(
    model: nn.Module, batch: TaskBatch, rates: list[torch.Tensor], mode: str, steps: int
) -> list[torch.Tensor]:
    """Meta-gradient w.r.t. the initial weights and the learned rates, by hand."""
    init = list(model.parameters())
    rates = [r.detach().clone().requires_grad_() for r in rates]

    def rate(i: int, k: int) -> torch.Tensor:
        if mode == "scalar":
            return rates[0]
        if mode == "per_layer_per_step":
            return rates[i][k]
        return rates[i]  # per_layer: a scalar per tensor; per_parameter: one per entry

    total = [torch.zeros_like(p) for p in init + rates]
    for task in batch:
        params = init
        for k in range(steps):
            loss = F.mse_loss(fcall(model, params, task.support_x), task.support_y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            params = [p - rate(i, k) * g for i, (p, g) in enumerate(zip(params, grads))]
        meta = F.mse_loss(fcall(model, params, task.query_x), task.query_y) / len(batch)
        for t, g in zip(total, torch.autograd.grad(meta, init + rates)):
            t += g
    return total


@pytest.mark.parametrize("mode", ["scalar", "per_layer", "per_layer_per_step", "per_parameter"])
def test_learned_inner_rates_equal_hand_written_loop(mode: str, vectorize: bool) -> None:
    torch.manual_seed(8)
    model = Net().double()
    module = MAML(
        copy.deepcopy(model),
        inner_optim=sgd(0.1),
        inner_steps=3,
        learn_inner_lr=mode,
        vectorize_tasks=vectorize,
    )
    # Float64 rates without .double(): they follow the model's dtype.
    assert all(lr.dtype == torch.float64 for lr in module.inner_lrs)
    # Distinct rates per layer, step and entry: a step using another step's (or layer's) rate
    # changes the result.
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for lr in module.inner_lrs:
            lr.copy_(torch.rand(lr.shape, generator=g, dtype=torch.float64) * 0.15 + 0.02)
    rates = [lr.detach().clone() for lr in module.inner_lrs]
    batch = regression_batch(seed=8)
    got = module_grads(module, batch)
    want = reference_learned_rates(model, batch, rates, mode, 3)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def count_host_syncs(fn: Callable[[], object]) -> int:
    """Tensors read back to Python (``bool``, ``item``) while ``fn`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func.overloadpacket.__name__ == "_local_scalar_dense":
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


@pytest.mark.parametrize("steps", [1, 4])
def test_loop_checks_each_task_with_one_host_sync(steps: int) -> None:
    # Every inner loss, the final weights, the query loss and the meta-gradient are checked,
    # but the per-task loop reads them back together once per task.
    batch = regression_batch(seed=9)
    for policy, per_task in (("raise", 1), ("skip", 1), ("off", 0)):
        module = MAML(
            Net().double(),
            inner_optim=sgd(0.1),
            inner_steps=steps,
            nan_policy=policy,
            vectorize_tasks=False,
        )
        syncs = count_host_syncs(lambda m=module: m.training_step(batch, 0).backward())
        assert syncs == per_task * len(batch), policy


def test_nan_in_inner_step_is_named_or_skipped() -> None:
    torch.manual_seed(9)
    batch = regression_batch(seed=9)
    batch.support_y[1, 0, 0] = float("nan")
    module = MAML(Net().double(), inner_optim=sgd(0.1), inner_steps=2)
    with pytest.raises(
        NonFiniteError,
        match=r"task 1 of batch 0: non-finite inner loss nan at "
        r"inner step 0 \(the fast weights are finite",
    ):
        module.training_step(batch, 0)
    diverging = MAML(Net().double(), inner_optim=sgd(1e200), inner_steps=3)
    with pytest.raises(
        NonFiniteError,
        match=r"inner loss inf at inner step 1 .* largest is "
        r"[0-9.e+]+ in 'head\.bias'",
    ):
        diverging.training_step(regression_batch(seed=9), 0)
    exploding = MAML(Net().double(), inner_optim=sgd(float("inf")), inner_steps=3)
    with pytest.raises(
        NonFiniteError,
        match=r"at inner step 1; fast weights already non-finite: "
        r"features\.0\.weight",
    ):
        exploding.training_step(regression_batch(seed=9), 0)
    skipping = MAML(Net().double(), inner_optim=sgd(0.1), inner_steps=2, nan_policy="skip")
    ref = MAML(copy.deepcopy(skipping.model), inner_optim=sgd(0.1), inner_steps=2)
    with pytest.warns(UserWarning, match="skipping task 1 of batch 0"):
        got = module_grads(skipping, batch)
    kept = TaskBatch.stack([batch[0], batch[2]])
    for a, b in zip(got, module_grads(ref, kept)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inner_steps": -1}, r"inner_steps must be an integer >= 0, got -1"),
        (
            {"adapt": ["decoder"]},
            r"adapt='decoder' matches no trainable parameter of Net; its "
            r"parameters are: features\.0\.weight",
        ),
        ({"nan_policy": "ignore"}, r"nan_policy must be 'raise', 'skip' or 'off'"),
        ({"learn_inner_lr": "per_tensor"}, r"learn_inner_lr must be None, 'scalar'"),
        ({"eval_inner_steps": 2, "eval_report_steps": [5]}, r"must lie in 0\.\.eval_inner_steps"),
    ],
)
def test_bad_configuration_is_explained(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MAML(Net(), **kwargs)


def test_model_without_trainable_parameters_and_bad_anil_head() -> None:
    frozen = Net().requires_grad_(False)
    with pytest.raises(ValueError, match="Net has no trainable parameters"):
        MAML(frozen)
    with pytest.raises(
        ValueError,
        match=r"ANIL head='classifier' matches no submodule of Net "
        r"\(its submodules: features, head\)",
    ):
        ANIL(Net(), head="classifier")


@pytest.mark.parametrize(
    ("inner", "options"),
    [
        (functools.partial(torch.optim.SGD, lr=0.1), {}),
        (functools.partial(torch.optim.Adam, lr=0.05), {}),
        (functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), {"truncate": 2}),
        (functools.partial(torch.optim.SGD, lr=0.1), {"learn_inner_lr": "per_layer_per_step"}),
        (functools.partial(torch.optim.RMSprop, lr=0.01), {"multi_step_loss": True}),
    ],
    ids=["sgd", "adam", "momentum-truncated", "learned-lr-per-step", "rmsprop-multistep"],
)
def test_checkpointed_unroll_gives_the_plain_meta_gradient(inner: object, options: dict) -> None:
    torch.manual_seed(10)
    model = nn.Sequential(
        nn.Linear(1, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.BatchNorm1d(8, track_running_stats=False),
        nn.Tanh(),
        nn.Linear(8, 1),
    ).double()
    plain = MAML(copy.deepcopy(model), inner_optim=inner, inner_steps=4, **options).double()
    ckpt = MAML(
        copy.deepcopy(model), inner_optim=inner, inner_steps=4, checkpoint_unroll=True, **options
    ).double()
    batch = regression_batch(seed=10)
    want = module_grads(plain, batch)
    got = module_grads(ckpt, batch)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
