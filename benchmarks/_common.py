"""Shared workloads, hand-written baselines and timing helpers of the benchmarks.

Not a benchmark itself: ``bench_engine.py``, ``bench_memory.py`` and ``bench_nan_guard.py``
import it (they run as scripts, so this folder is on ``sys.path``).

Workloads (MAML's two standard settings, with random data of the right shapes):

* ``conv4``: Conv-4 (64 filters, batch-statistics BatchNorm) on 1x28x28 images, 5-way
  1-shot with 15 queries per class, inner SGD lr 0.4 (MAML's Omniglot setting).
* ``mlp``: the 1-40-40-1 ReLU MLP on sinusoid tasks of 10 support and 10 query points,
  inner SGD lr 0.01 (MAML's regression setting).

Every meta-iteration computes the meta-gradient into ``.grad`` of the model's parameters
(the outer optimizer step is the same for every variant and is not timed).
"""

from __future__ import annotations

import copy
import functools
import gc
import inspect
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

# The scripts run from a checkout (``python benchmarks/NAME.py``): make the package importable.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import metalight  # noqa: E402
from metalight.data import TaskBatch  # noqa: E402
from metalight.functional import monkeypatch  # noqa: E402
from metalight.models import MLP, Conv4  # noqa: E402

LossFn = Callable[[Tensor, Tensor], Tensor]


# --- setup ------------------------------------------------------------------------------------
def setup_torch(threads: int, device: str) -> torch.device:
    """Set the intra-op thread count and check the device; returns the device."""
    torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available in this torch build")
    return torch.device(device)


def describe_machine(device: torch.device) -> str:
    """One line: torch version, device, threads, CPU count, load average."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"torch {torch.__version__}; device: {where}; torch threads: {torch.get_num_threads()}; "
        f"CPUs: {os.cpu_count()}; load average: {load}"
    )


def sync(device: torch.device) -> None:
    """Wait for queued device work (CUDA) so wall-clock times are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- workloads --------------------------------------------------------------------------------
@dataclass
class Case:
    """One meta-iteration setting: a model, a meta-batch and the inner loop."""

    name: str
    model: nn.Module
    batch: TaskBatch
    lr: float
    steps: int
    loss: LossFn

    @property
    def tasks(self) -> int:
        return len(self.batch)

    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def float64(self, tasks: int | None = None) -> Case:
        """A float64 copy (first ``tasks`` tasks): for checks that float32 rounding would blur."""
        b = self.batch[: tasks or self.tasks]
        batch = TaskBatch(
            *(
                t.double() if t.is_floating_point() else t
                for t in (b.support_x, b.support_y, b.query_x, b.query_y, b.info)
            )
        )
        model = copy.deepcopy(self.model).double()
        return Case(self.name + " float64", model, batch, self.lr, self.steps, self.loss)


def conv4_case(
    tasks: int = 4,
    steps: int = 5,
    device: torch.device | str = "cpu",
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    seed: int = 0,
) -> Case:
    """Conv-4 on 1x28x28, ``ways``-way ``shots``-shot, ``queries`` queries per class."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Conv4(in_channels=1, out_features=ways, hidden=64, image_size=28).to(device)
    support_y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1)
    batch = TaskBatch(
        torch.randn(tasks, ways * shots, 1, 28, 28, generator=g),
        support_y.contiguous(),
        torch.randn(tasks, ways * queries, 1, 28, 28, generator=g),
        query_y.contiguous(),
        torch.arange(ways).expand(tasks, -1).contiguous(),
    ).to(device)
    return Case(
        f"conv4 {tasks}x{ways}w{shots}s{queries}q {steps} step", model, batch, 0.4, steps,
        F.cross_entropy,
    )  # fmt: skip


def mlp_case(
    tasks: int = 25,
    steps: int = 1,
    device: torch.device | str = "cpu",
    points: int = 10,
    seed: int = 0,
) -> Case:
    """The 1-40-40-1 MLP on sinusoid tasks of ``points`` support and query points."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLP().to(device)
    amplitude = torch.empty(tasks, 1, 1).uniform_(0.1, 5.0, generator=g)
    phase = torch.empty(tasks, 1, 1).uniform_(0.0, math.pi, generator=g)
    sx = torch.empty(tasks, points, 1).uniform_(-5.0, 5.0, generator=g)
    qx = torch.empty(tasks, points, 1).uniform_(-5.0, 5.0, generator=g)
    batch = TaskBatch(
        sx,
        amplitude * torch.sin(sx - phase),
        qx,
        amplitude * torch.sin(qx - phase),
        torch.cat([amplitude, phase], dim=-1).squeeze(1),
    ).to(device)
    return Case(f"mlp {tasks}x{points}pt {steps} step", model, batch, 0.01, steps, F.mse_loss)


# --- hand-written baselines -------------------------------------------------------------------
def _hand_adapt(case: Case, t: int) -> Tensor:
    """Adapt to task ``t`` with functional_call + autograd.grad; returns its query loss."""
    model, b, lr = case.model, case.batch, case.lr
    fast = dict(model.named_parameters())
    for _ in range(case.steps):
        loss = case.loss(functional_call(model, fast, (b.support_x[t],)), b.support_y[t])
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {name: p - lr * g for (name, p), g in zip(fast.items(), grads)}
    return case.loss(functional_call(model, fast, (b.query_x[t],)), b.query_y[t])


def hand_sum(case: Case) -> None:
    """Hand-written MAML: every task's query loss, then one backward of their mean."""
    losses = [_hand_adapt(case, t) for t in range(case.tasks)]
    torch.stack(losses).mean().backward()


def hand_per_task(case: Case) -> None:
    """Hand-written MAML with one backward per task (frees each task's graph at once)."""
    n = case.tasks
    for t in range(n):
        (_hand_adapt(case, t) / n).backward()


# --- metalight --------------------------------------------------------------------------------
def ml_functional(case: Case) -> None:
    """metalight's functional view only (monkeypatch), with a hand-written SGD step."""
    model, b, lr = case.model, case.batch, case.lr
    losses = []
    for t in range(case.tasks):
        fmodel = monkeypatch(model, copy_initial_weights=False)
        for _ in range(case.steps):
            params = fmodel.fast_params
            loss = case.loss(fmodel(b.support_x[t]), b.support_y[t])
            grads = torch.autograd.grad(loss, params, create_graph=True)
            fmodel.update_params([p - lr * g for p, g in zip(params, grads)])
        losses.append(case.loss(fmodel(b.query_x[t]), b.query_y[t]))
    torch.stack(losses).mean().backward()


def make_higher_style(case: Case) -> Callable[[], None]:
    """The higher-style API: ``innerloop_ctx`` + ``diffopt.step``, one backward of the mean."""
    opt = torch.optim.SGD(case.model.parameters(), lr=case.lr)
    model, b = case.model, case.batch

    def run() -> None:
        losses = []
        for t in range(case.tasks):
            with metalight.innerloop_ctx(model, opt, copy_initial_weights=False) as (fm, diffopt):
                for _ in range(case.steps):
                    diffopt.step(case.loss(fm(b.support_x[t]), b.support_y[t]))
                losses.append(case.loss(fm(b.query_x[t]), b.query_y[t]))
        torch.stack(losses).mean().backward()

    return run


def module_options() -> set[str]:
    """The keyword arguments ``MetaLearningModule`` accepts (they change between versions)."""
    from metalight.lightning import MetaLearningModule

    return set(inspect.signature(MetaLearningModule.__init__).parameters)


def make_module(case: Case, nan_policy: str = "raise", vectorize: bool | None = None) -> nn.Module:
    """A second-order MAML ``MetaLearningModule`` over the case's model (shared, not copied).

    ``vectorize``: None keeps the module's default; True/False sets ``vectorize_tasks``
    (False: the per-task loop), and raises where this version has no such option.
    """
    from metalight.lightning import MetaLearningModule

    kwargs = {}
    if vectorize is not None:
        if "vectorize_tasks" not in module_options():
            raise TypeError("this MetaLearningModule has no vectorize_tasks option")
        kwargs["vectorize_tasks"] = vectorize
    return MetaLearningModule(
        case.model,
        inner_optim=functools.partial(torch.optim.SGD, lr=case.lr),
        inner_steps=case.steps,
        nan_policy=nan_policy,  # type: ignore[arg-type]
        **kwargs,
    )


def module_path(module: nn.Module) -> str:
    """Which meta-step the module takes: "vectorized" or "loop" (per-task loop)."""
    use = getattr(module, "_use_vectorized", None)
    return "vectorized" if use is not None and use() else "loop"


def make_module_step(
    case: Case, nan_policy: str = "raise", vectorize: bool | None = None
) -> Callable[[], None]:
    """``MetaLearningModule.training_step`` + backward of its surrogate (as Lightning does)."""
    module = make_module(case, nan_policy, vectorize)

    def run() -> None:
        module.training_step(case.batch, 0).backward()

    run.path = module_path(module)  # type: ignore[attr-defined]
    return run


# --- timing -----------------------------------------------------------------------------------
def time_interleaved(
    fns: dict[str, Callable[[], None]],
    rounds: int,
    warmup: int,
    device: torch.device,
    before: Callable[[], None] | None = None,
    budget_s: float | None = None,
) -> dict[str, list[float]]:
    """Wall-clock seconds of each function, interleaved: every round runs each once.

    The order rotates from round to round so that no variant always runs first (or right
    after a given other one). ``before`` runs untimed before every call (e.g. zero_grad).
    With ``budget_s``, no new round starts once that many seconds of timed rounds have
    passed (at least 3 rounds run); the lists' length says how many ran.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            if before is not None:
                before()
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    # Collect before every call, so that no call pays for another's garbage; freezing what
    # exists now (torch, Lightning, the workloads) makes each collection take microseconds
    # instead of about 0.2 s.
    gc.collect()
    gc.freeze()
    start_all = time.perf_counter()
    try:
        for r in range(rounds):
            if budget_s is not None and r >= 3 and time.perf_counter() - start_all > budget_s:
                break
            k = r % len(names)
            for name in names[k:] + names[:k]:
                if before is not None:
                    before()
                gc.collect()
                sync(device)
                start = time.perf_counter()
                fns[name]()
                sync(device)
                times[name].append(time.perf_counter() - start)
    finally:
        gc.unfreeze()
    return times


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def paired_ratio(times: Sequence[float], base: Sequence[float]) -> tuple[float, float, float]:
    """Quartiles of the per-round ratio ``times[r] / base[r]`` (same round, close in time)."""
    return quartiles([t / b for t, b in zip(times, base)])


def spread(values: Sequence[float]) -> float:
    """Interquartile range relative to the median (a noise measure)."""
    q1, q2, q3 = quartiles(values)
    return (q3 - q1) / q2


def check_finite(case: Case) -> None:
    """Fail loudly if the workload's meta-gradient is not finite (a broken benchmark)."""
    case.zero_grad()
    hand_sum(case)
    bad = [n for n, p in case.model.named_parameters() if not torch.isfinite(p.grad).all()]
    case.zero_grad()
    if bad:
        raise RuntimeError(f"{case.name}: non-finite meta-gradient in {bad}")
