"""Peak memory of one Conv-4 MAML meta-iteration against the meta-batch size.

Run from the repository root::

    python benchmarks/bench_memory.py            # 4, 16 and 32 tasks: about 4 minutes
    python benchmarks/bench_memory.py --quick    # 2 and 4 tasks, two variants: about 30 s
    python benchmarks/bench_memory.py --device cuda

Workload: Conv-4 on 1x28x28, 5-way 1-shot, 15 queries per class, 5 inner SGD steps,
second order. Variants:

* ``ml/module``: ``MetaLearningModule.training_step`` + backward, with its defaults (for
  Conv-4 the per-task loop: it takes each task's meta-gradient at once, so that task's
  unroll graph is freed before the next task runs; the output says which step it took);
* ``hand/sum`` (the baseline): a hand-written loop (``functional_call`` +
  ``autograd.grad(create_graph=True)``) that keeps every task's graph until one backward of
  the mean query loss;
* ``hand/per-task``: the hand-written loop with one backward per task (what the module
  does, without its bookkeeping).

Each configuration runs in a fresh subprocess: one warm-up iteration, then the measured
one. On CPU the number is the growth of the resident set during the measured iteration: the
kernel's peak-RSS mark (``VmHWM``) is reset to the current RSS just before it (``echo 5 >
/proc/self/clear_refs``) and read after it; if the reset is not allowed it falls back to
``ru_maxrss``, which can only see growth past the process's earlier peak (it says so). The
child runs with a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``) and calls
``malloc_trim`` before measuring, so freed tensors go back to the OS and RSS follows live
memory closely. ``tracemalloc`` does not see torch's allocations, and torch has no CPU
allocator statistics. On CUDA it is ``torch.cuda.max_memory_allocated()`` minus the
allocation before the iteration; the CUDA allocator's statistics are exact within a
process, so there the configurations share one process (``--fresh`` to spawn anyway).

Target (from the module's design): the module's peak stays flat as the meta-batch grows,
while the summed-loss loop's grows linearly. Not a test: RSS includes allocator slack.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

MiB = 2.0**20
VARIANTS = ("ml/module", "hand/sum", "hand/per-task")


# --- child: one configuration -------------------------------------------------------------------
def measure(variant: str, tasks: int, args: argparse.Namespace) -> dict[str, object]:
    """Build the configuration, run the warm-up, then measure one meta-iteration."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from _common import (
        conv4_case,
        hand_per_task,
        hand_sum,
        make_module_step,
        setup_torch,
    )
    from _memory import measure_peak

    device = setup_torch(args.threads, args.device)
    case = conv4_case(tasks, args.steps, device)
    module_step = make_module_step(case) if variant == "ml/module" else None
    fns = {
        "ml/module": module_step,
        "hand/sum": lambda: hand_sum(case),
        "hand/per-task": lambda: hand_per_task(case),
    }
    fn = fns[variant]
    assert fn is not None
    for _ in range(args.warmup):
        case.zero_grad()
        fn()
    case.zero_grad()
    result = measure_peak(fn, device)
    result["path"] = getattr(module_step, "path", "")
    grads = [p.grad for p in case.model.parameters()]
    result["finite"] = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    return result


def child(args: argparse.Namespace) -> None:
    print("RESULT " + json.dumps(measure(args.variant, args.tasks[0], args)), flush=True)


# --- parent --------------------------------------------------------------------------------
def run_child(variant: str, tasks: int, args: argparse.Namespace) -> dict[str, object]:
    if args.device == "cuda" and not args.fresh:
        import torch

        result = measure(variant, tasks, args)
        gc.collect()
        torch.cuda.empty_cache()
        return result
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _memory import child_env

    env = child_env()
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--variant",
        variant,
        "--tasks",
        str(tasks),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--warmup",
        str(args.warmup),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{variant} with {tasks} tasks failed:\n{proc.stdout}\n{proc.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 and 4 tasks, two variants")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tasks", type=int, nargs="+", help="meta-batch sizes (4 16 32)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=5, help="inner steps")
    parser.add_argument("--warmup", type=int, default=1, help="iterations before measuring")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per config")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="on CUDA too, one fresh process per configuration (default: one process)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sizes = args.tasks or ([2, 4] if args.quick else [4, 16, 32])
    variants = args.variants or (["ml/module", "hand/sum"] if args.quick else list(VARIANTS))

    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"torch {torch.__version__}; device: {args.device}; torch threads: {args.threads}; "
        f"CPUs: {os.cpu_count()}; load average: {load}"
    )
    print(
        f"Conv-4 1x28x28, 5-way 1-shot, 15 queries, {args.steps} inner steps, second order; "
        f"{args.warmup} warm-up iteration(s), "
        + (
            "configurations in one process (CUDA peak statistics reset between them)"
            if args.device == "cuda" and not args.fresh
            else "each configuration in a fresh process"
        )
    )
    results: dict[tuple[str, int], list[dict[str, object]]] = {}
    # Interleave: every repeat runs every configuration once.
    for _ in range(args.repeats):
        for tasks in sizes:
            for variant in variants:
                results.setdefault((variant, tasks), []).append(run_child(variant, tasks, args))
    method = next(iter(results.values()))[0]["method"]
    paths = {r["path"] for rs in results.values() for r in rs if r["path"]}
    if paths:
        print(f"ml/module's meta-step (its default): {', '.join(sorted(map(str, paths)))}")
    print(f"peak memory during one meta-iteration ({method}), MiB; min over repeats")
    header = f"{'tasks':>5}  " + "  ".join(f"{v:>14}" for v in variants)
    if "hand/sum" in variants and "ml/module" in variants:
        header += "  module/hand-sum"
    if "hand/per-task" in variants and "ml/module" in variants:
        header += "  module/hand-per-task"
    print(header)
    for tasks in sizes:
        peaks = {v: min(float(r["peak_bytes"]) for r in results[(v, tasks)]) for v in variants}
        row = f"{tasks:>5}  " + "  ".join(f"{peaks[v] / MiB:>14.1f}" for v in variants)
        if "hand/sum" in variants and "ml/module" in variants:
            row += f"  {peaks['ml/module'] / peaks['hand/sum']:>15.3f}"
        if "hand/per-task" in variants and "ml/module" in variants:
            row += f"  {peaks['ml/module'] / peaks['hand/per-task']:>20.3f}"
        print(row)
    spreads = [
        max(float(r["peak_bytes"]) for r in rs) / min(float(r["peak_bytes"]) for r in rs) - 1
        for rs in results.values()
    ]
    if args.repeats > 1:
        print(f"noise: largest spread of a configuration over repeats {max(spreads):.1%}")
    bad = [k for k, rs in results.items() if not all(r["finite"] for r in rs)]
    if bad:
        print(f"WARNING: non-finite meta-gradients in {bad}")
    seconds = {k: min(float(r["seconds"]) for r in rs) for k, rs in results.items()}
    print(
        "time of the measured iteration, s: "
        + "; ".join(f"{v} x{t}: {seconds[(v, t)]:.2f}" for t in sizes for v in variants)
    )


if __name__ == "__main__":
    main()
