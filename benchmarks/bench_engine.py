"""Times one MAML meta-iteration with metalight against a hand-written loop in the same run.

Run from the repository root::

    python benchmarks/bench_engine.py            # about 3 minutes on 2 CPU cores
    python benchmarks/bench_engine.py --quick    # about 30 s, few rounds: rough numbers
    python benchmarks/bench_engine.py --profile  # also where metalight's extra time goes
    python benchmarks/bench_engine.py --device cuda

Cases (second-order MAML, inner SGD, meta-gradient into ``.grad``; no outer step):

* Conv-4 on 1x28x28, 5-way 1-shot, 15 queries per class, 4 tasks, 5 inner steps;
* the 1-40-40-1 MLP, 25 sinusoid tasks of 10 points, 1 and 10 inner steps.

Variants, all run interleaved (every round runs each variant once, in rotating order):

* ``hand/sum`` (the baseline): per task ``torch.func.functional_call`` +
  ``torch.autograd.grad(create_graph=True)`` + ``p - lr * g``, the query loss, then one
  backward of the mean query loss;
* ``hand/per-task``: the same with one backward per task (what the module does);
* ``ml/view``: metalight's functional view (``monkeypatch``) with the hand-written step;
* ``ml/higher-api`` (a): ``innerloop_ctx`` + ``diffopt.step``, one backward of the mean;
* ``ml/module`` (b): ``MetaLearningModule.training_step`` + backward of its surrogate, with
  the module's defaults (the header says which meta-step they chose: where the module
  vectorises tasks by default, e.g. for the MLP, that is one ``vmap``-ed computation);
* ``ml/module-loop``: the same with ``vectorize_tasks=False`` (the per-task loop, one
  meta-gradient per task), timed only where the default step is the vectorised one.

Ratios are medians of per-round ratios against the baseline measured in the same round,
with their interquartile range. Target: metalight within 5% of the hand-written loop on
Conv-4 and within 15% on the MLP, where Python overhead dominates. Each metalight variant is
judged against a hand-written loop: ``ml/module-loop`` against ``hand/per-task`` (the same
structure), the others against ``hand/sum``: PASS when the 75th percentile of the
ratio is within the target, MISS when the 25th percentile is beyond it, else "noise".
Before timing, every variant's meta-gradient is checked against the baseline's (on a
float64 copy of two tasks, where rounding cannot hide a wrong term).

``--profile`` then profiles the MLP case (10 inner steps, or ``--profile-steps``) with
cProfile and torch.profiler's op counts, interleaved, and prints where ``ml/higher-api``
and the module's per-task loop spend time that ``hand/sum`` and ``hand/per-task`` do not,
in ms per iteration. Not a test: numbers depend on the machine and its load (printed with
the results).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
from collections.abc import Callable

import torch
from _common import (
    Case,
    conv4_case,
    describe_machine,
    hand_per_task,
    hand_sum,
    make_higher_style,
    make_module_step,
    ml_functional,
    mlp_case,
    module_options,
    paired_ratio,
    quartiles,
    setup_torch,
    spread,
    sync,
    time_interleaved,
)

BASELINE = "hand/sum"
# Which hand-written loop each metalight variant is judged against (same backward structure).
MATCHED = {
    "ml/view": "hand/sum",
    "ml/higher-api": "hand/sum",
    "ml/module": "hand/sum",
    "ml/module-loop": "hand/per-task",
}


def variants(case: Case, diagnostic: bool = True) -> dict[str, Callable[[], None]]:
    fns = {
        "hand/sum": lambda: hand_sum(case),
        "hand/per-task": lambda: hand_per_task(case),
        "ml/view": lambda: ml_functional(case),
        "ml/higher-api": make_higher_style(case),
        "ml/module": make_module_step(case),
    }
    # Where the module's default is the task-vectorised step, time its per-task loop too.
    if "vectorize_tasks" in module_options():
        loop = make_module_step(case, vectorize=False)
        if fns["ml/module"].path != loop.path:  # type: ignore[attr-defined]
            fns["ml/module-loop"] = loop
    if not diagnostic:  # --quick: only what the targets are judged on
        del fns["ml/view"]
    return fns


def check_gradients(case: Case, tol: float = 1e-6) -> None:
    """Every variant must produce the baseline's meta-gradient (relative L2 error < tol).

    Checked on a float64 copy of the case's first two tasks: in float32, five second-order
    steps at lr 0.4 amplify rounding (``torch.add(p, g, alpha=-lr)`` against ``p - lr * g``)
    to about 4e-4 on CPU, and on CUDA the nondeterministic cuDNN backward makes two runs of
    the same loop differ by about 6e-2. In float64 the variants agree to about 1e-14.
    """
    case = case.float64(tasks=2)
    fns = variants(case)

    def flat() -> torch.Tensor:
        return torch.cat([p.grad.flatten() for p in case.model.parameters()])

    case.zero_grad()
    fns[BASELINE]()
    ref = flat()
    if not torch.isfinite(ref).all():
        raise RuntimeError(f"{case.name}: the baseline's meta-gradient is not finite")
    for name, fn in fns.items():
        case.zero_grad()
        fn()
        err = ((flat() - ref).norm() / ref.norm()).item()
        if not err < tol:
            raise RuntimeError(f"{case.name}: {name}'s meta-gradient differs (rel. error {err})")
    case.zero_grad()


def verdict(ratio: tuple[float, float, float], target: float) -> str:
    q1, _, q3 = ratio
    if q3 <= 1 + target:
        return "PASS"
    if q1 > 1 + target:
        return "MISS"
    return "noise"


def run_case(
    case: Case,
    target: float,
    rounds: int,
    warmup: int,
    device: torch.device,
    quick: bool,
    budget_s: float | None = None,
) -> list[str]:
    check_gradients(case)
    fns = variants(case, diagnostic=not quick)
    times = time_interleaved(fns, rounds, warmup, device, case.zero_grad, budget_s)
    rounds = len(times[BASELINE])
    path = fns["ml/module"].path  # type: ignore[attr-defined]
    lines = [
        f"\n{case.name} (second order), {rounds} rounds after {warmup} warm-up; "
        f"target: within {target:.0%} of the hand-written loop; ml/module's default step: "
        f"{path}",
        f"{'variant':<15} {'median ms':>10} {'IQR/med':>8}   {'vs hand/sum [IQR]':<22} "
        f"{'vs hand/per-task [IQR]':<22} verdict",
    ]
    base = times[BASELINE]
    for name, values in times.items():
        med = quartiles(values)[1] * 1e3
        cols = []
        for ref in ("hand/sum", "hand/per-task"):
            q1, q2, q3 = paired_ratio(values, times[ref])
            cols.append(f"{q2:.3f} [{q1:.3f}-{q3:.3f}]")
        judged = ""
        if name in MATCHED:
            ratio = paired_ratio(values, times[MATCHED[name]])
            judged = f"{verdict(ratio, target)} (vs {MATCHED[name]})"
        lines.append(
            f"{name:<15} {med:>10.2f} {spread(values):>8.1%}   {cols[0]:<22} {cols[1]:<22} {judged}"
        )
    noise = max(spread(v) for v in times.values())
    lines.append(
        f"noise: largest IQR/median of a variant's times {noise:.1%}; baseline min/median/max "
        f"{min(base) * 1e3:.2f}/{quartiles(base)[1] * 1e3:.2f}/{max(base) * 1e3:.2f} ms"
    )
    return lines


# --- profile ----------------------------------------------------------------------------------
def _short(key: tuple[str, int, str]) -> str:
    file, line, func = key
    if file == "~":
        return func
    parts = file.replace("\\", "/").split("/")
    if "metalight" in parts:
        file = "/".join(parts[len(parts) - parts[::-1].index("metalight") - 1 :])
    elif "torch" in parts:
        file = "/".join(parts[len(parts) - parts[::-1].index("torch") - 1 :])
    else:
        file = parts[-1]
    return f"{file}:{line}({func})"


def profile(case: Case, iters: int, device: torch.device, top: int) -> list[str]:
    """Where metalight's extra time goes on ``case``, per meta-iteration."""
    fns = variants(case)
    module = "ml/module-loop" if "ml/module-loop" in fns else "ml/module"
    names = (BASELINE, "hand/per-task", "ml/higher-api", module)
    lines = [f"\nprofile of {case.name}: {iters} iterations of each variant, interleaved"]
    plain = time_interleaved(fns, max(iters, 5), 2, device, before=case.zero_grad)
    profilers = {name: cProfile.Profile() for name in names}
    for r in range(iters):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            case.zero_grad()
            profilers[name].enable()
            fns[name]()
            sync(device)
            profilers[name].disable()
    stats = {name: pstats.Stats(profilers[name]).stats for name in names}  # type: ignore[attr-defined]
    for name in names:
        total = sum(v[2] for v in stats[name].values()) / iters * 1e3
        lines.append(
            f"  {name:<14} unprofiled {quartiles(plain[name])[1] * 1e3:7.2f} ms, "
            f"under cProfile {total:7.2f} ms per iteration"
        )

    def table(name: str, ref: str) -> None:
        mine, base = stats[name], stats[ref]
        rows = []
        for key, (_, calls, tt, _, _) in mine.items():
            b_calls, b_tt = (base[key][1], base[key][2]) if key in base else (0, 0.0)
            rows.append((tt - b_tt, key, calls, b_calls))
        rows.sort(reverse=True)
        lines.append(
            f"\n  {name} vs {ref}: functions by extra own time (cProfile; ms and calls per "
            "iteration)"
        )
        lines.append(f"  {'extra ms':>9} {'calls':>8} {'ref calls':>9}  function")
        for extra, key, calls, b_calls in rows[:top]:
            lines.append(
                f"  {extra / iters * 1e3:>9.3f} {calls / iters:>8.0f} {b_calls / iters:>9.0f}  "
                f"{_short(key)}"
            )
        ours = [
            (ct, key, calls)
            for key, (_, calls, _, ct, _) in mine.items()
            if "metalight" in key[0].replace("\\", "/").split("/")
        ]
        ours.sort(reverse=True)
        lines.append(f"\n  {name}: metalight functions by cumulative time (ms per iteration)")
        lines.append(f"  {'cum ms':>9} {'calls':>8}  function")
        for ct, key, calls in ours[:top]:
            lines.append(f"  {ct / iters * 1e3:>9.3f} {calls / iters:>8.0f}  {_short(key)}")

    table("ml/higher-api", BASELINE)
    table(module, "hand/per-task")

    # torch operator counts: what metalight launches that the hand-written loop does not.
    counts: dict[str, dict[str, tuple[int, float]]] = {}
    for name in names:
        case.zero_grad()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fns[name]()
            sync(device)
        counts[name] = {e.key: (e.count, e.self_cpu_time_total) for e in prof.key_averages()}
    for name, ref in (("ml/higher-api", BASELINE), (module, "hand/per-task")):
        mine, base = counts[name], counts[ref]
        diff = []
        for k in set(mine) | set(base):
            (c, t), (bc, bt) = mine.get(k, (0, 0.0)), base.get(k, (0, 0.0))
            if c != bc:
                diff.append((c - bc, (t - bt) / 1e3, k, c, bc))
        diff.sort(key=lambda row: (-abs(row[0]), row[2]))
        lines.append(
            f"\n  torch ops {name} vs {ref} (one iteration under torch.profiler): ops whose "
            f"count differs; total {sum(c for c, _ in mine.values())} vs "
            f"{sum(c for c, _ in base.values())} ops"
        )
        lines.append(f"  {'count':>7} {'self ms':>8}  op (count vs ref)")
        for d, ms, k, c, bc in diff[:top]:
            lines.append(f"  {d:>+7d} {ms:>+8.2f}  {k} ({c} vs {bc})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (about 30 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=["conv4", "mlp1", "mlp10"],
        default=["conv4", "mlp1", "mlp10"],
    )
    parser.add_argument("--rounds", type=int, help="timed rounds per case (default by case)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default by case)")
    parser.add_argument(
        "--budget", type=float, help="per case: no new round after this many seconds"
    )
    parser.add_argument("--profile", action="store_true", help="profile the MLP case")
    parser.add_argument("--profile-steps", type=int, default=10, help="inner steps profiled")
    parser.add_argument("--profile-iters", type=int, default=20)
    parser.add_argument("--top", type=int, default=15, help="rows per profile table")
    args = parser.parse_args()
    device = setup_torch(args.threads, args.device)
    print(describe_machine(device))

    # (builder, target, rounds, warm-up, quick rounds, quick warm-up)
    plans = {
        "conv4": (lambda: conv4_case(4, 5, device), 0.05, 20, 2, 2, 1),
        "mlp1": (lambda: mlp_case(25, 1, device), 0.15, 100, 5, 20, 1),
        "mlp10": (lambda: mlp_case(25, 10, device), 0.15, 40, 2, 4, 1),
    }
    if device.type == "cuda":  # GPU rounds are fast: more of them
        plans["conv4"] = (plans["conv4"][0], 0.05, 60, 5, 10, 1)
    for key in args.cases:
        build, target, rounds, warmup, q_rounds, q_warmup = plans[key]
        if args.quick:
            rounds, warmup = q_rounds, q_warmup
        rounds = args.rounds or rounds
        warmup = warmup if args.warmup is None else args.warmup
        for line in run_case(build(), target, rounds, warmup, device, args.quick, args.budget):
            print(line, flush=True)
    if args.profile:
        for line in profile(
            mlp_case(25, args.profile_steps, device), args.profile_iters, device, args.top
        ):
            print(line, flush=True)
    print(f"\nat the end: {describe_machine(device)}")


if __name__ == "__main__":
    main()
