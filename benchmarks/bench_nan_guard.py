"""Cost of the NaN/Inf guard of ``MetaLearningModule`` in one MAML meta-iteration.

Run from the repository root::

    python benchmarks/bench_nan_guard.py            # about 2 minutes on 2 CPU cores
    python benchmarks/bench_nan_guard.py --quick    # about 20 s, few rounds
    python benchmarks/bench_nan_guard.py --device cuda

Times ``training_step`` + backward of a second-order MAML module with ``nan_policy="raise"``
(the default: finiteness checks of the inner losses, the query loss, the fast weights and
the task's meta-gradient; the per-task loop reads a task's checks back with one host sync,
the vectorised step syncs per check), ``"skip"`` (the same checks) and ``"off"``,
interleaved round by round, on the MLP (25 sinusoid tasks of 10 points, 1 and 10 inner
steps) and on Conv-4 (4 tasks, 5-way 1-shot, 15 queries, 5 inner steps). Ratios are medians
of per-round ratios against ``"off"`` with their interquartile range. Where the module's
default meta-step is the task-vectorised one (the MLP), the per-task loop
(``vectorize_tasks=False``) is timed as well, against its own ``"off"``. ``--quick`` leaves
out ``"skip"``.

It also counts the host syncs (``bool``/``item`` of a tensor, seen as
``aten::_local_scalar_dense``) of one iteration under each policy, so the extra time can be
read per check.

The issue sets no target; the guard is meant to be cheap (one scalar check per step). Not a
test: numbers depend on the machine and its load (printed with the results).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _common import (
    Case,
    conv4_case,
    describe_machine,
    make_module_step,
    mlp_case,
    module_options,
    paired_ratio,
    quartiles,
    setup_torch,
    spread,
    sync,
    time_interleaved,
)

POLICIES = ("off", "raise", "skip")


def count_host_syncs(fn: Callable[[], None]) -> int | None:
    """How many tensors ``fn`` reads back to Python (``bool``, ``item``): each a host sync.

    Counted as ``aten::_local_scalar_dense`` calls under a dispatch mode (torch.profiler's
    ``key_averages`` took 8 s per MLP iteration). None where the mode is not available.
    """
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
    except ImportError:
        return None

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func.overloadpacket.__name__ == "_local_scalar_dense":
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def run_case(
    case: Case,
    rounds: int,
    warmup: int,
    device: torch.device,
    budget_s: float | None = None,
    quick: bool = False,
) -> list[str]:
    policies = POLICIES[:2] if quick else POLICIES
    default = make_module_step(case, "off")
    path = default.path  # type: ignore[attr-defined]
    groups: list[tuple[str, bool | None]] = [("", None)]
    if path == "vectorized" and "vectorize_tasks" in module_options():
        groups.append(("loop ", False))  # the per-task loop too
    fns, base_of = {}, {}
    for prefix, vectorize in groups:
        for policy in policies:
            fns[prefix + policy] = make_module_step(case, policy, vectorize)
            base_of[prefix + policy] = prefix + "off"
    syncs = {}
    for name, fn in fns.items():  # also a first warm-up call of each
        case.zero_grad()
        syncs[name] = count_host_syncs(fn)
        sync(device)
    case.zero_grad()
    times = time_interleaved(fns, rounds, warmup, device, case.zero_grad, budget_s)
    rounds = len(times["off"])
    lines = [
        f"\n{case.name} (second order), {rounds} rounds after {warmup} warm-up; the module's "
        f"default meta-step: {path}"
        + ("; 'loop': vectorize_tasks=False" if len(groups) > 1 else ""),
        f"{'nan_policy':<11} {'median ms':>10} {'IQR/med':>8}   {'vs off [IQR]':<24} "
        "host syncs per iteration",
    ]
    for name, values in times.items():
        q1, q2, q3 = paired_ratio(values, times[base_of[name]])
        ratio = f"{q2:.3f} [{q1:.3f}-{q3:.3f}]"
        lines.append(
            f"{name:<11} {quartiles(values)[1] * 1e3:>10.2f} {spread(values):>8.1%}   "
            f"{ratio:<24} {'n/a' if syncs[name] is None else syncs[name]}"
        )
    for prefix, _ in groups:
        base = times[prefix + "off"]
        diffs = [r - o for r, o in zip(times[prefix + "raise"], base)]
        extra = quartiles(diffs)[1] * 1e3
        line = f"{prefix}raise - {prefix}off: {extra:.2f} ms per iteration (median of per-round "
        line += "differences)"
        more, fewer = syncs[prefix + "raise"], syncs[prefix + "off"]
        if more is not None and fewer is not None and more > fewer:
            line += (
                f" for {more - fewer} more host syncs: {extra / (more - fewer) * 1e3:.0f} us each"
            )
        lines.append(line)
    noise = max(spread(v) for v in times.values())
    lines.append(f"noise: largest IQR/median of a variant's times {noise:.1%}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (about 20 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=["mlp1", "mlp10", "conv4"],
        default=["mlp1", "mlp10", "conv4"],
    )
    parser.add_argument("--rounds", type=int, help="timed rounds per case (default by case)")
    parser.add_argument(
        "--warmup", type=int, help="untimed rounds first (default 1; 0 for a quick Conv-4)"
    )
    parser.add_argument(
        "--budget", type=float, help="per case: no new round after this many seconds"
    )
    args = parser.parse_args()
    device = setup_torch(args.threads, args.device)
    print(describe_machine(device))
    # (builder, rounds, quick rounds)
    plans = {
        "mlp1": (lambda: mlp_case(25, 1, device), 100, 30),
        "mlp10": (lambda: mlp_case(25, 10, device), 40, 6),
        "conv4": (lambda: conv4_case(4, 5, device), 15, 2),
    }
    if device.type == "cuda":
        plans["conv4"] = (plans["conv4"][0], 60, 10)
    for key in args.cases:
        build, rounds, quick_rounds = plans[key]
        rounds = args.rounds or (quick_rounds if args.quick else rounds)
        warmup = args.warmup
        if warmup is None:  # one untimed (profiled) call of each policy always comes first
            warmup = 0 if args.quick and key == "conv4" else 1
        for line in run_case(build(), rounds, warmup, device, args.budget, args.quick):
            print(line, flush=True)
    print(f"\nat the end: {describe_machine(device)}")


if __name__ == "__main__":
    main()
