"""Task-vectorised adaptation: its meta-gradient is the per-task loop's (float64)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metalight.algorithms import ANIL, IMAML, Reptile
from metalight.data import TaskBatch
from metalight.lightning import MetaLearningModule, NonFiniteError
from metalight.models import MLP, Conv4
from metalight.optim import DifferentiableOptimizer
from metalight.vectorized import (
    check_vectorizable,
    vectorized_meta_loss,
    vectorized_task_losses,
)

TASKS = 3
WAYS = 3


def conv_batch(tasks: int = TASKS, seed: int = 0) -> TaskBatch:
    """Tiny 3-way 1-shot image tasks (2 queries per class), 16x16, float64."""
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(WAYS).expand(tasks, -1).contiguous()
    query_y = torch.arange(WAYS).repeat_interleave(2).expand(tasks, -1).contiguous()
    return TaskBatch(
        torch.randn(tasks, WAYS, 1, 16, 16, generator=g, dtype=torch.float64),
        support_y,
        torch.randn(tasks, 2 * WAYS, 1, 16, 16, generator=g, dtype=torch.float64),
        query_y,
        torch.arange(WAYS).expand(tasks, -1).contiguous(),
    )


def sine_batch(tasks: int = TASKS + 1, points: int = 6, seed: int = 0) -> TaskBatch:
    """Sinusoid regression tasks, float64."""
    g = torch.Generator().manual_seed(seed)
    amplitude = torch.rand(tasks, 1, 1, generator=g, dtype=torch.float64) * 4 + 1
    phase = torch.rand(tasks, 1, 1, generator=g, dtype=torch.float64) * 3
    sx = torch.rand(tasks, points, 1, generator=g, dtype=torch.float64) * 10 - 5
    qx = torch.rand(tasks, points, 1, generator=g, dtype=torch.float64) * 10 - 5
    return TaskBatch(
        sx,
        amplitude * torch.sin(sx - phase),
        qx,
        amplitude * torch.sin(qx - phase),
        torch.cat([amplitude, phase], dim=-1).squeeze(1),
    )


def conv4(batch_norm: str = "batch") -> nn.Module:
    torch.manual_seed(0)
    return Conv4(out_features=WAYS, hidden=4, image_size=16, batch_norm=batch_norm).double()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP(hidden=(16, 16)).double()


def sgd(lr: float) -> Callable[..., torch.optim.Optimizer]:
    return functools.partial(torch.optim.SGD, lr=lr)


def loop_meta_gradient(module: MetaLearningModule, batch: TaskBatch) -> list[Tensor]:
    """The reference: the module's per-task training step and its backward, as Lightning."""
    meta_params = module.meta_parameters()
    for p in meta_params:
        p.grad = None
    # The loop explicitly: with vectorize_tasks="auto" an MLP would take the vectorised path.
    module._loop_training_step(batch, 0).backward()
    grads = [p.grad for p in meta_params]
    for p in meta_params:
        p.grad = None
    assert all(g is not None for g in grads)
    return grads  # type: ignore[return-value]


def vectorized_meta_gradient(module: MetaLearningModule, batch: TaskBatch) -> list[Tensor]:
    return list(torch.autograd.grad(vectorized_meta_loss(module, batch), module.meta_parameters()))


def assert_same_meta_gradient(module: MetaLearningModule, batch: TaskBatch) -> None:
    expected = loop_meta_gradient(module, batch)
    got = vectorized_meta_gradient(module, batch)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    for name, g, e in zip(names, got, expected, strict=True):
        torch.testing.assert_close(g, e, msg=lambda m, name=name: f"{name}: {m}")


# --- the meta-gradient equals the loop's ---------------------------------------------------------
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "fomaml"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("model", ["mlp", "conv4-batchnorm"])
def test_meta_gradient_equals_the_loops(model: str, steps: int, first_order: bool) -> None:
    if model == "mlp":
        net, batch, lr = mlp(), sine_batch(), 0.02
    else:
        net, batch, lr = conv4("batch"), conv_batch(), 0.4
        assert any(isinstance(m, nn.BatchNorm2d) and m.training for m in net.modules())
    module = MetaLearningModule(
        net, inner_optim=sgd(lr), inner_steps=steps, first_order=first_order
    )
    assert_same_meta_gradient(module, batch)


def safe_sqrt(v: Tensor) -> Tensor:
    # sqrt whose derivative at exactly 0 is 0 (a zero second moment), as the optimizers use.
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, 1.0).sqrt(), 0.0)


def hand_written_step(name: str, k: int, p: Tensor, g: Tensor, state: dict[str, Tensor]) -> Tensor:
    """One inner step of torch.optim's SGD (momentum 0.9, dampening 0.1) or Adam, by hand."""
    if name == "sgd-momentum":
        lr, mu, dampening = 0.02, 0.9, 0.1
        state["buf"] = g if k == 0 else mu * state["buf"] + (1 - dampening) * g
        return p - lr * state["buf"]
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    t = k + 1
    state["m"] = b1 * state.get("m", torch.zeros_like(p)) + (1 - b1) * g
    state["v"] = b2 * state.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
    denom = safe_sqrt(state["v"]) / (1 - b2**t) ** 0.5 + eps
    return p - lr / (1 - b1**t) * state["m"] / denom


HAND_WRITTEN_OPTIMIZERS = {
    "sgd-momentum": functools.partial(torch.optim.SGD, lr=0.02, momentum=0.9, dampening=0.1),
    "adam": functools.partial(torch.optim.Adam, lr=0.01),
}


@pytest.mark.parametrize("optimizer", list(HAND_WRITTEN_OPTIMIZERS))
@pytest.mark.parametrize("model", ["mlp", "conv4-batchnorm"])
def test_meta_gradient_equals_a_hand_written_reference(model: str, optimizer: str) -> None:
    # Independent of the loop: torch.func.functional_call per task and the optimizer's
    # update rule written out, differentiated through 2 steps in float64.
    if model == "mlp":
        net, batch, loss_fn = mlp(), sine_batch(), F.mse_loss
    else:
        net, batch, loss_fn = conv4("batch"), conv_batch(), F.cross_entropy
    reference = copy.deepcopy(net)  # training-mode BatchNorm updates its running statistics
    module = MetaLearningModule(net, inner_optim=HAND_WRITTEN_OPTIMIZERS[optimizer], inner_steps=2)
    got = vectorized_meta_gradient(module, batch)

    names = [n for n, _ in reference.named_parameters()]
    init = list(reference.parameters())
    want = [torch.zeros_like(p) for p in init]
    for task in batch:
        params = init
        states: list[dict[str, Tensor]] = [{} for _ in init]
        for k in range(2):
            out = functional_call(reference, dict(zip(names, params)), (task.support_x,))
            grads = torch.autograd.grad(loss_fn(out, task.support_y), params, create_graph=True)
            params = [
                hand_written_step(optimizer, k, p, g, state)
                for p, g, state in zip(params, grads, states, strict=True)
            ]
        out = functional_call(reference, dict(zip(names, params)), (task.query_x,))
        meta = loss_fn(out, task.query_y) / len(batch)
        for w, g in zip(want, torch.autograd.grad(meta, init), strict=True):
            w += g
    assert len(got) == len(want)
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(g, w, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("model", ["mlp", "conv4-batchnorm"])
def test_anil_meta_gradient_equals_its_loop(model: str, first_order: bool) -> None:
    # ANIL's loop runs the body once per task; the vectorised step runs head(body(x)) per
    # inner step with only the head batched over tasks: the same meta-gradient.
    net, batch, lr = (mlp(), sine_batch(), 0.02) if model == "mlp" else (conv4(), conv_batch(), 0.4)

    class OddForward(type(net)):  # forward is not head(body(x)): ANIL must not call it
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 0.0

    net.__class__ = OddForward
    module = ANIL(net, inner_optim=sgd(lr), inner_steps=3, first_order=first_order)
    assert_same_meta_gradient(module, batch)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("model", ["mlp", "conv4-batchnorm"])
def test_reptile_meta_gradient_equals_its_loop(model: str, optimizer: str) -> None:
    # Reptile's meta-gradient is the mean weight difference, not a loss gradient: the
    # vectorised step computes it from all tasks' adapted weights at once.
    net, batch, lr = (mlp(), sine_batch(), 0.02) if model == "mlp" else (conv4(), conv_batch(), 0.4)
    inner = sgd(lr) if optimizer == "sgd" else functools.partial(torch.optim.Adam, lr=lr / 10)
    module = Reptile(net, inner_optim=inner, inner_steps=3)
    expected = loop_meta_gradient(module, batch)
    module._vectorized_training_step(batch, 0).backward()
    got = [p.grad for p in module.meta_parameters()]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    assert any(e.abs().max() > 1e-6 for e in expected)
    # Its query losses are not what its meta-gradient differentiates: the public
    # loss function refuses it rather than giving MAML's meta-gradient.
    with pytest.raises(ValueError, match="Reptile's meta-gradient is not the gradient"):
        vectorized_meta_loss(module, batch)


def test_per_task_losses_equal_the_loops() -> None:
    module = MetaLearningModule(conv4(), inner_optim=sgd(0.4), inner_steps=2)
    batch = conv_batch()
    losses = vectorized_task_losses(module, batch)
    assert losses.shape == (TASKS,)
    expected = [module.task_meta_gradient(task, module.meta_parameters(), 1.0)[0] for task in batch]
    torch.testing.assert_close(losses.detach(), torch.stack(expected))


@pytest.mark.parametrize("mode", ["running-train", "running-eval"])
def test_batch_norm_with_running_statistics(mode: str) -> None:
    net = conv4("running")
    if mode == "running-eval":
        net.eval()
    before = {n: b.clone() for n, b in net.named_buffers()}
    module = MetaLearningModule(net, inner_optim=sgd(0.4), inner_steps=2)
    assert_same_meta_gradient(module, conv_batch())
    # The loop updates running statistics in per-task copies only; so does nothing here.
    for n, b in net.named_buffers():
        torch.testing.assert_close(b, before[n], rtol=0, atol=0)


@pytest.mark.parametrize(
    "options",
    [
        {"learn_inner_lr": "per_layer_per_step", "multi_step_loss": True},
        {"learn_inner_lr": "per_parameter"},
        {"learn_inner_lr": "scalar", "truncate": 1},
        {"adapt": ["head"]},
        {"inner_optim": functools.partial(torch.optim.Adam, lr=0.01)},
        {"inner_optim": functools.partial(torch.optim.SGD, lr=0.02, momentum=0.9, nesterov=True)},
    ],
    ids=["maml++", "meta-sgd", "truncated", "head-only", "adam", "nesterov"],
)
def test_module_options(options: dict[str, Any]) -> None:
    kwargs: dict[str, Any] = {"inner_optim": sgd(0.02), "inner_steps": 3, **options}
    assert_same_meta_gradient(MetaLearningModule(mlp(), **kwargs), sine_batch())


def test_conv4_with_learned_rates_and_multi_step_loss() -> None:
    module = MetaLearningModule(
        conv4(),
        inner_optim=sgd(0.4),
        inner_steps=2,
        learn_inner_lr="per_layer_per_step",
        multi_step_loss=True,
    )
    assert_same_meta_gradient(module, conv_batch())


# --- why the inner gradient is not taken with torch.func.grad inside vmap ------------------------
def naive_vmap_meta_gradient(module: MetaLearningModule, batch: TaskBatch) -> list[Tensor]:
    """torch.func.grad for the inner gradient inside vmap over tasks, nn modules as they are."""
    model = module.model
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    lr = module.inner_optimizer.param_groups[0]["lr"]

    def query_loss(start: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
        def support_loss(fast: dict[str, Tensor]) -> Tensor:
            return F.cross_entropy(functional_call(model, fast, (sx,)), sy)

        fast = start
        for _ in range(module.inner_steps):
            grads = torch.func.grad(support_loss)(fast)
            fast = {n: fast[n] - lr * grads[n] for n in names}
        return F.cross_entropy(functional_call(model, fast, (qx,)), qy)

    losses = vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(
        dict(zip(names, params, strict=True)),
        batch.support_x,
        batch.support_y,
        batch.query_x,
        batch.query_y,
    )
    return list(torch.autograd.grad(losses.mean(), params))


def test_naive_vmap_is_right_without_batch_norm() -> None:
    module = MetaLearningModule(conv4("none"), inner_optim=sgd(0.4), inner_steps=2)
    batch = conv_batch()
    for got, expected in zip(
        naive_vmap_meta_gradient(module, batch), loop_meta_gradient(module, batch), strict=True
    ):
        torch.testing.assert_close(got, expected)


def test_naive_vmap_with_batch_norm_gives_a_wrong_meta_gradient() -> None:
    """Documents why the inner gradient is taken outside vmap (torch 2.13).

    With ``torch.func.grad`` inside ``vmap`` and ``nn.BatchNorm2d`` in training mode, the
    query losses are right but the meta-gradient is wrong by percents, even in float64: the
    batch-norm backward batching rule. If a torch upgrade makes this test fail, the bug is
    fixed upstream; the vectorised path does not depend on it either way.
    """
    module = MetaLearningModule(conv4("batch"), inner_optim=sgd(0.4), inner_steps=2)
    batch = conv_batch()
    naive = naive_vmap_meta_gradient(module, batch)
    expected = loop_meta_gradient(module, batch)
    relative = max(float((g - e).norm() / e.norm()) for g, e in zip(naive, expected) if e.norm())
    assert relative > 1e-3, f"naive vmap + BatchNorm2d matched the loop ({relative:.1e})"
    # The exact vectorised path, on the same module and batch:
    for got, e in zip(vectorized_meta_gradient(module, batch), expected, strict=True):
        torch.testing.assert_close(got, e)


# --- what is refused ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "hook"),
    [
        (lambda: IMAML(mlp()), "task_meta_gradient"),
    ],
    ids=["imaml"],
)
def test_refuses_algorithms_with_their_own_unroll(
    make: Callable[[], MetaLearningModule], hook: str
) -> None:
    module = make()
    with pytest.raises(ValueError, match=rf"{type(module).__name__} overrides {hook}\(\)"):
        vectorized_meta_loss(module, sine_batch())


def test_anils_exemption_does_not_cover_a_subclass_with_its_own_adapt() -> None:
    class MyANIL(ANIL):
        def adapt_task(self, *args: Any, **kwargs: Any) -> Any:
            return super().adapt_task(*args, **kwargs)

    class OldStyle(MetaLearningModule):  # the public entry point, overridden
        def adapt(self, *args: Any, **kwargs: Any) -> Any:
            return super().adapt(*args, **kwargs)

    check_vectorizable(ANIL(mlp()))
    assert ANIL._overridden_loop_hooks == () and MyANIL._overridden_loop_hooks == ("adapt_task",)
    with pytest.raises(ValueError, match=r"MyANIL overrides adapt_task\(\)"):
        check_vectorizable(MyANIL(mlp()))
    assert not MyANIL(mlp())._use_vectorized()
    with pytest.raises(ValueError, match=r"OldStyle overrides adapt\(\)"):
        check_vectorizable(OldStyle(mlp()))


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (lambda: nn.LSTM(1, 4, batch_first=True), r"0 \(LSTM\) cannot be task-vectorised"),
        (lambda: nn.GRUCell(1, 4), r"0 \(GRUCell\) cannot be task-vectorised"),
        (
            lambda: nn.utils.parametrizations.spectral_norm(nn.Linear(1, 4)),
            r"0 \(spectral_norm\) cannot be task-vectorised",
        ),
        (lambda: nn.utils.spectral_norm(nn.Linear(1, 4)), r"0 \(spectral_norm\)"),
    ],
    ids=["lstm", "gru-cell", "spectral-norm", "spectral-norm-hook"],
)
def test_refuses_layers_vmap_cannot_batch(layer: Callable[[], nn.Module], message: str) -> None:
    model = nn.Sequential(layer(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=message):
        MetaLearningModule(model, vectorize_tasks=True)
    # "auto" trains such a model with the loop instead of crashing in vmap.
    assert not MetaLearningModule(model)._use_vectorized()


def test_refuses_checkpointed_unrolls() -> None:
    module = MetaLearningModule(mlp(), checkpoint_unroll=True)
    with pytest.raises(ValueError, match="checkpoint_unroll"):
        check_vectorizable(module)


def test_refuses_custom_optimizers_and_grad_callbacks() -> None:
    class Plain(DifferentiableOptimizer):
        def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
            raise AssertionError("not reached")

    class CustomOptimizer(MetaLearningModule):
        def make_inner_optimizer(self, fmodel: Any, create_graph: bool) -> Any:
            return Plain(self.inner_optimizer, self.model.parameters(), fmodel=fmodel)

    with pytest.raises(ValueError, match="Plain updates in place"):
        vectorized_meta_loss(CustomOptimizer(mlp()), sine_batch())

    class Clipped(MetaLearningModule):
        def make_inner_optimizer(self, fmodel: Any, create_graph: bool) -> Any:
            diffopt = super().make_inner_optimizer(fmodel, create_graph)
            diffopt._grad_callback = lambda grads: grads
            return diffopt

    with pytest.raises(ValueError, match="grad_callback"):
        vectorized_meta_loss(Clipped(mlp()), sine_batch())


def test_refuses_sync_batch_norm_in_training() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.SyncBatchNorm(2), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"^1 is a SyncBatchNorm"):
        check_vectorizable(MetaLearningModule(net))


def test_non_finite_inner_loss_names_the_task_and_step() -> None:
    batch = sine_batch()
    batch.support_x[2, 0] = float("nan")
    module = MetaLearningModule(mlp(), inner_optim=sgd(0.02), inner_steps=2)
    with pytest.raises(NonFiniteError, match=r"inner loss at inner step 0 in task\(s\) \[2\]"):
        vectorized_meta_loss(module, batch)
    module.nan_policy = "off"
    assert not torch.isfinite(vectorized_meta_loss(module, batch))


def test_auto_uses_vectorised_steps_where_measured_faster() -> None:
    mlp_module = MetaLearningModule(mlp(), inner_optim=sgd(0.02), inner_steps=2)
    conv_module = MetaLearningModule(conv4(), inner_optim=sgd(0.4), inner_steps=2)
    assert mlp_module._use_vectorized()
    assert not conv_module._use_vectorized()
    assert ANIL(mlp(), inner_steps=2)._use_vectorized()
    assert not ANIL(conv4(), inner_steps=2)._use_vectorized()
    assert Reptile(mlp(), inner_steps=2)._use_vectorized()
    assert not IMAML(mlp(), inner_steps=2)._use_vectorized()
    forced = MetaLearningModule(mlp(), inner_optim=sgd(0.02), inner_steps=2, vectorize_tasks=False)
    assert not forced._use_vectorized()
    with pytest.raises(ValueError, match="vectorize_tasks must be true, false or 'auto'"):
        MetaLearningModule(mlp(), vectorize_tasks="sometimes")  # type: ignore[arg-type]


def test_training_step_takes_the_vectorised_path_with_the_loop_gradient() -> None:
    torch.manual_seed(3)
    module = MetaLearningModule(mlp(), inner_optim=sgd(0.02), inner_steps=2).double()
    batch = sine_batch()
    want = loop_meta_gradient(module, batch)
    module.training_step(batch, 0).backward()
    for p, w in zip(module.meta_parameters(), want):
        torch.testing.assert_close(p.grad, w)
