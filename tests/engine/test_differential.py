"""Differential tests of the engine: model structures x optimizers x unroll policies x entry points.

For every case, in float64:
(a) the fast weights after each inner step equal ``torch.optim`` stepping a deep copy of the
    model (and the view's buffers equal the copy's, and the meta-gradient's backward pass,
    which recomputes steps for a checkpointed unroll, moves none of them);
(b) the meta-gradient equals a hand-written unroll over ``torch.func.functional_call`` with the
    SGD/Adam rules spelled out (``tests/engine/reference.py``), for every policy where it is
    defined (first order: detached gradients; truncated to the last T steps: the earlier ones
    first order);
(c) the user's module is untouched (see :class:`~tests.engine.reference.ModuleSnapshot`),
    after every case and after errors raised inside the inner loop.
A failure names the structure, optimizer, policy, entry point and step.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from metalight import innerloop_ctx
from metalight.algorithms import MAML
from metalight.data import Task, TaskBatch
from metalight.functional import FunctionalModule, monkeypatch
from metalight.optim import get_diff_optim
from metalight.vectorized import vectorized_meta_loss
from tests.engine.reference import (
    REFERENCE_OPTIMIZERS,
    ModuleSnapshot,
    reference_unroll,
    torch_optim_trajectory,
)
from tests.engine.zoo import STRUCTURES, Run, Structure
from tests.optim_table import OPTIMIZER_CASES, OptimCase

STEPS = 3
TRUNCATE = 1
BY_NAME = {s.name: s for s in STRUCTURES}
CASES = {c.id: c for c in OPTIMIZER_CASES}
#: Structures that see the whole optimizer table (plain unroll through innerloop_ctx).
FULL_TABLE = ("mlp", "shared_module", "lstm")
#: Every structure sees these with every policy and entry point.
CORE = ("sgd-momentum", "adam")

# The policies each entry point runs; "no_higher_grads" has no meta-gradient to compare.
CTX_POLICIES = ("plain", "no_higher_grads", "first_order", "truncated", "checkpoint")
MAML_POLICIES = ("plain", "first_order", "truncated", "checkpoint", "vectorized")

# Structures whose forward vmap cannot batch (no batching rule for these ops): the
# task-vectorised step refuses them in one line, and "auto" trains them with the loop
# (test_unbatchable_structures_are_refused_and_auto_takes_the_loop).
UNBATCHABLE: dict[str, str] = {
    "lstm": "LSTM",
    "gru_2layer": "GRU",
    "rnn": "RNN",
    "lstm_gru_cells": "LSTMCell|GRUCell",
    "spectral_norm": "spectral_norm",
}


def _first_order_steps(policy: str) -> int:
    return {"first_order": STEPS, "truncated": STEPS - TRUNCATE}.get(policy, 0)


def _build(structure: Structure) -> nn.Module:
    torch.manual_seed(0)
    return structure.build().double()


def _data(structure: Structure, seed: int, tasks: int | None = None) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if tasks is None:
        return structure.inputs(5, gen)
    pairs = [structure.inputs(5, gen) for _ in range(tasks)]
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])


def _view_run(fmodel: FunctionalModule, params: Sequence[Tensor] | None = None) -> Run:
    def run(path: str, x: Tensor) -> Tensor:
        view = fmodel
        for part in path.split(".") if path else ():
            view = getattr(view, part)
        return view(x) if params is None else view.call(params, x)

    return run


def _mse(structure: Structure, run: Run, data: tuple[Tensor, Tensor]) -> Tensor:
    return torch.nn.functional.mse_loss(structure.call(run, data[0]), data[1])


def _close(actual: Any, expected: Any, label: str) -> None:
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{label}: {m}")


def _compare_grads(
    grads: Sequence[Tensor | None], expected: Sequence[Tensor | None], names: list[str], label: str
) -> None:
    assert len(grads) == len(expected), f"{label}: {len(grads)} meta-gradients"
    for name, g, e in zip(names, grads, expected, strict=True):
        if g is None and e is None:
            continue
        # A parameter the meta-loss does not reach may come back as None or as zeros.
        g = torch.zeros_like(e) if g is None else g
        e = torch.zeros_like(g) if e is None else e
        assert torch.isfinite(g).all(), f"{label}: non-finite meta-gradient for {name}"
        _close(g, e, f"{label}, meta-gradient of {name}")


@functools.cache
def _reference(name: str, case_id: str, first_order_steps: int) -> tuple[Any, Any, Any, Any]:
    """(torch.optim trajectory, its buffers, hand-written meta-gradient) for one case."""
    structure, case = BY_NAME[name], CASES[case_id]
    model = _build(structure)
    support, query = _data(structure, 1), _data(structure, 2)
    trajectory, buffers = torch_optim_trajectory(
        model, structure.call, case.torch_cls, case.kwargs, support, STEPS
    )
    meta = None
    if case.torch_cls in REFERENCE_OPTIMIZERS:
        _, meta = reference_unroll(
            model,
            structure.call,
            case.torch_cls,
            case.kwargs,
            support,
            query,
            STEPS,
            first_order_steps,
        )
    return trajectory, buffers, meta, [n for n, _ in model.named_parameters()]


def _run_ctx(
    structure: Structure, model: nn.Module, case: OptimCase, policy: str, entry: str
) -> tuple[list[list[Tensor]], dict[str, Tensor], list[Tensor | None] | None]:
    support, query = _data(structure, 1), _data(structure, 2)
    opt = case.torch_cls(model.parameters(), **case.kwargs)
    kwargs: dict[str, Any] = {
        "no_higher_grads": {"track_higher_grads": False},
        "first_order": {"first_order": True},
        "truncated": {"truncate": TRUNCATE},
        "checkpoint": {"checkpoint": True},
    }.get(policy, {})
    if entry == "get_diff_optim":
        fmodel = monkeypatch(model, copy_initial_weights=False)
        diffopt = get_diff_optim(opt, model.parameters(), fmodel=fmodel)
        context: Any = _Given(fmodel, diffopt)
    else:
        context = innerloop_ctx(model, opt, copy_initial_weights=False, **kwargs)
    with context as (fmodel, diffopt):
        if policy in ("truncated", "checkpoint"):
            diffopt.unroll(lambda p: _mse(structure, _view_run(fmodel, p), support), STEPS)
        else:
            for _ in range(STEPS):
                diffopt.step(_mse(structure, _view_run(fmodel), support))
        if policy == "no_higher_grads":
            history = [list(fmodel.parameters())]
        else:
            history = [list(fmodel.parameters(time=t)) for t in range(1, STEPS + 1)]
        buffers = {n: b.detach().clone() for n, b in fmodel.named_buffers()}
        grads = None
        if policy != "no_higher_grads":
            meta = _mse(structure, _view_run(fmodel), query)
            moved = {n: b.detach().clone() for n, b in fmodel.named_buffers()}
            trainable = [p for p in model.parameters() if p.requires_grad]
            found = iter(torch.autograd.grad(meta, trainable, allow_unused=True))
            grads = [next(found) if p.requires_grad else None for p in model.parameters()]
            # The backward pass (a checkpointed unroll recomputes steps in it) moves none.
            for name, b in fmodel.named_buffers():
                assert torch.equal(b, moved[name]), f"{policy}: backward moved buffer {name}"
    return history, buffers, grads


class _Given:
    """A context yielding an existing (fmodel, diffopt), for the get_diff_optim entry point."""

    def __init__(self, fmodel: FunctionalModule, diffopt: Any) -> None:
        self.pair = (fmodel, diffopt)

    def __enter__(self) -> tuple[FunctionalModule, Any]:
        return self.pair

    def __exit__(self, *exc: object) -> None:
        return None


def _maml(structure: Structure, model: nn.Module, case: OptimCase, policy: str) -> MAML:
    return MAML(
        model,
        inner_optim=functools.partial(case.torch_cls, **case.kwargs),
        inner_steps=STEPS,
        first_order=policy == "first_order",
        truncate=TRUNCATE if policy == "truncated" else None,
        checkpoint_unroll=policy == "checkpoint",
        vectorize_tasks=policy == "vectorized",
    )


def _run_maml(
    structure: Structure, model: nn.Module, case: OptimCase, policy: str
) -> tuple[list[list[Tensor]] | None, list[Tensor | None]]:
    maml = _maml(structure, model, case, policy)
    meta_params = maml.meta_parameters()
    order = {id(p): i for i, p in enumerate(meta_params)}
    if policy == "vectorized":
        x, y = _data(structure, 1, tasks=2)
        qx, qy = _data(structure, 2, tasks=2)
        loss = vectorized_meta_loss(maml, TaskBatch(x, y, qx, qy, torch.zeros(2, 1)))
        found = torch.autograd.grad(loss, meta_params, allow_unused=True)
        return None, [found[order[id(p)]] if id(p) in order else None for p in model.parameters()]
    (x, y), (qx, qy) = _data(structure, 1), _data(structure, 2)
    task = Task(x, y, qx, qy, torch.zeros(1))
    history: list[list[Tensor]] = []
    maml.adapt(
        task,
        STEPS,
        create_graph=True,
        on_step=lambda k, fmodel: history.append(list(fmodel.fast_params)),
    )
    _, found = maml.task_meta_gradient(task, meta_params, 1.0)
    # A second meta-step from the same weights gives bitwise the same meta-gradient (it
    # failed outright when an unroll left fast weights inside the module).
    _, again = maml.task_meta_gradient(task, meta_params, 1.0)
    for a, b in zip(found, again, strict=True):
        assert (a is None and b is None) or torch.equal(a, b), "second meta-step differs"
    return history, [found[order[id(p)]] if id(p) in order else None for p in model.parameters()]


def _vectorized_reference(structure: Structure, case: OptimCase) -> list[Tensor | None]:
    model = _build(structure)
    x, y = _data(structure, 1, tasks=2)
    qx, qy = _data(structure, 2, tasks=2)
    total: list[Tensor | None] = [None] * len(list(model.parameters()))
    for t in range(2):
        _, grads = reference_unroll(
            model,
            structure.call,
            case.torch_cls,
            case.kwargs,
            (x[t], y[t]),
            (qx[t], qy[t]),
            STEPS,
        )
        for i, g in enumerate(grads):
            if g is not None:
                total[i] = g / 2 if total[i] is None else total[i] + g / 2
    return total


def _cases() -> list[Any]:
    params = []
    for index, structure in enumerate(STRUCTURES):
        extra = OPTIMIZER_CASES[(7 * index + 3) % len(OPTIMIZER_CASES)].id
        table = [c.id for c in OPTIMIZER_CASES] if structure.name in FULL_TABLE else [extra]
        chosen = list(dict.fromkeys([*CORE, *table]))
        for case_id in chosen:
            policies = CTX_POLICIES if case_id in CORE else ("plain",)
            for policy in policies:
                params.append((structure.name, case_id, policy, "innerloop_ctx"))
            if case_id in CORE:
                params.append((structure.name, case_id, "plain", "get_diff_optim"))
                if structure.maml:
                    for policy in MAML_POLICIES:
                        if policy == "vectorized" and structure.name in UNBATCHABLE:
                            continue
                        params.append((structure.name, case_id, policy, "MAML"))
    marked = []
    for name, case_id, policy, entry in params:
        marks: list[Any] = []
        if (name, policy) == ("weight_norm", "vectorized"):
            # vmap runs aten::_weight_norm through its slow fallback, and says so.
            marks.append(pytest.mark.filterwarnings("ignore:There is a performance drop"))
        marked.append(pytest.param(name, case_id, policy, entry, marks=marks))
    return marked


@pytest.mark.parametrize(("structure_name", "case_id", "policy", "entry"), _cases())
def test_engine_matches_references(
    structure_name: str, case_id: str, policy: str, entry: str
) -> None:
    structure, case = BY_NAME[structure_name], CASES[case_id]
    label = f"structure={structure_name} optimizer={case_id} policy={policy} entry={entry}"
    model = _build(structure)
    snapshot = ModuleSnapshot(model)
    trajectory, twin_buffers, meta, names = _reference(
        structure_name, case_id, _first_order_steps(policy)
    )
    buffers = None
    if entry == "MAML":
        history, grads = _run_maml(structure, model, case, policy)
        if policy == "vectorized":
            meta = _vectorized_reference(structure, case) if meta is not None else None
    else:
        history, buffers, grads = _run_ctx(structure, model, case, policy, entry)
    snapshot.check(label)

    # (a) fast weights, step for step (only the last one is kept without higher grads).
    if history is not None:
        expected = trajectory[-len(history) :]
        first = STEPS - len(history) + 1
        for k, (got, want) in enumerate(zip(history, expected, strict=True)):
            assert len(got) == len(want), f"{label}: {len(got)} fast weights"
            for name, g, w in zip(names, got, want, strict=True):
                _close(g.detach(), w, f"{label}, step {first + k}, fast weight {name}")
    if buffers is not None:
        assert buffers.keys() == twin_buffers.keys(), f"{label}: buffer names"
        for name in buffers:
            _close(buffers[name], twin_buffers[name], f"{label}, after step {STEPS}, buffer {name}")
    # (b) meta-gradients against the hand-written unroll.
    if meta is not None and grads is not None:
        _compare_grads(grads, meta, names, label)


def _step_then_raise(
    structure: Structure, model: nn.Module, opt: torch.optim.Optimizer, x: Tensor
) -> None:
    # higher's default, detached initial weights, this time.
    with innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        diffopt.step(structure.call(_view_run(fmodel), x).pow(2).mean())
        raise KeyError("user")


@pytest.mark.parametrize("structure", STRUCTURES, ids=[s.name for s in STRUCTURES])
def test_views_agree_with_module_and_errors_leave_it_untouched(structure: Structure) -> None:
    model = _build(structure)
    snapshot = ModuleSnapshot(model)
    x, _ = _data(structure, 1)
    module_run: Run = lambda path, inp: model.get_submodule(path)(inp)  # noqa: E731
    twin = copy.deepcopy(model)
    twin_run: Run = lambda path, inp: twin.get_submodule(path)(inp)  # noqa: E731
    label = f"structure={structure.name}"

    fmodel = monkeypatch(model, copy_initial_weights=False)
    _close(structure.call(_view_run(fmodel), x), structure.call(twin_run, x), f"{label}, view")
    # New fast weights given as params= compute what the module computes with those weights.
    new = [p * 0.7 + 0.01 for p in fmodel.parameters()]
    out = structure.call(_view_run(fmodel, new), x)
    with torch.no_grad():
        for p, q in zip(twin.parameters(), new, strict=True):
            p.copy_(q)
    _close(out, structure.call(twin_run, x), f"{label}, view with params=")
    snapshot.check(f"{label} after views")

    # An error inside the module's forward (bad input), mid-swap.
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(structure.call(_view_run(fmodel), x).pow(2).mean())
        bad = x + 100 if not x.is_floating_point() else x[..., :1]
        with pytest.raises((RuntimeError, ValueError, IndexError)):
            structure.call(_view_run(fmodel), bad)
    snapshot.check(f"{label} after an error in forward")
    # An error raised by user code inside the context.
    with pytest.raises(KeyError, match="user"):
        _step_then_raise(structure, model, opt, x)
    snapshot.check(f"{label} after an error in the context")
    structure.call(module_run, x)  # the module itself still runs (and may move its buffers)


@pytest.mark.parametrize("structure_name", sorted(UNBATCHABLE))
def test_unbatchable_structures_are_refused_and_auto_takes_the_loop(structure_name: str) -> None:
    structure = BY_NAME[structure_name]
    case = CASES[CORE[0]]
    model = _build(structure)
    snapshot = ModuleSnapshot(model)
    with pytest.raises(ValueError, match=UNBATCHABLE[structure_name]) as refusal:
        _maml(structure, model, case, "vectorized")
    assert "\n" not in str(refusal.value), str(refusal.value)
    auto = MAML(model, inner_optim=functools.partial(case.torch_cls, **case.kwargs))
    assert auto.vectorize_tasks == "auto"
    assert not auto._decide_vectorized(), f"{structure_name}: 'auto' chose the vectorised step"
    snapshot.check(f"structure={structure_name} after the refusal")
