"""Long unrolls: peak memory and time of the plain, checkpointed and truncated unrolls.

One Conv-4 MAML meta-iteration of ``MetaLearningModule`` (5-way 1-shot, 15 queries per
class, 28x28, one task, inner SGD lr 0.4, second order) for k = 1, 5, 10, 20, 50 inner
steps with ``checkpoint_unroll=False`` (plain), ``checkpoint_unroll=True`` and
``truncate=5`` (k >= 20).

- Memory: each configuration in a fresh process, one warm-up iteration, then the peak
  growth during the measured one (``_memory.measure_peak``: RSS high-water mark reset just
  before it on CPU, ``torch.cuda.max_memory_allocated`` on CUDA).
- Time: in this process, the three policies interleaved round by round (same initial
  weights and task); a ratio is the median of the per-round ratios against the plain
  unroll of the same round, with its interquartile range.

Targets (issue "Long unrolls"): at k = 50 the checkpointed unroll uses at most a third of
the plain unroll's peak memory at no more than 1.5x its time; the truncated unroll (T = 5)
costs far less than the full one.

Usage:
    python benchmarks/bench_unroll.py [--quick] [--device cuda] [--threads 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLICIES = {
    "plain": {},
    "checkpointed": {"checkpoint_unroll": True},
    "truncated T=5": {"truncate": 5},
}


def build(policy: str, steps: int, device: str):
    """One meta-iteration of ``policy`` on ``_common``'s Conv-4 workload with one task.

    Every policy starts from the same initial weights and task (the workload is seeded).
    """
    import functools

    import torch

    sys.path.insert(0, str(HERE))
    from _common import conv4_case

    from metalight.algorithms import MAML

    case = conv4_case(tasks=1, steps=steps, device=device)
    module = MAML(
        case.model,
        inner_optim=functools.partial(torch.optim.SGD, lr=case.lr),
        inner_steps=steps,
        **POLICIES[policy],
    )

    def iteration() -> None:
        module.zero_grad(set_to_none=True)
        # The meta-gradient is taken inside (per task); backward() moves it into .grad.
        module.training_step(case.batch, 0).backward()

    return iteration


def child(policy: str, steps: int, device_name: str, threads: int) -> None:
    sys.path.insert(0, str(HERE))
    from _common import setup_torch
    from _memory import measure_peak

    device = setup_torch(threads, device_name)
    iteration = build(policy, steps, device_name)
    iteration()  # warm-up: thread pools, kernels' scratch space
    print("RESULT " + json.dumps(measure_peak(iteration, device)), flush=True)


def peak_in_child(policy: str, steps: int, args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(HERE))
    from _memory import child_env

    cmd = [sys.executable, __file__, "--child", policy, str(steps), args.device]
    cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{policy} at k={steps} failed:\n{proc.stdout}\n{proc.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="k = 5 and 20, 3 rounds")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, help="timed rounds per k (default 5, quick 3)")
    parser.add_argument("--steps", type=int, nargs="+", help="values of k (1 5 10 20 50)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        policy, steps, device = args.child
        child(policy, int(steps), device, args.threads)
        return
    sys.path.insert(0, str(HERE))
    from _common import describe_machine, paired_ratio, setup_torch, time_interleaved
    from _memory import MiB

    device = setup_torch(args.threads, args.device)
    steps_list = args.steps or ([5, 20] if args.quick else [1, 5, 10, 20, 50])
    rounds = args.rounds or (3 if args.quick else 5)
    print(describe_machine(device))
    print(
        "Conv-4 MAML meta-iteration, 5-way 1-shot, 15 queries, 1 task; peak: growth during "
        f"one iteration in a fresh process; time: {rounds} interleaved rounds"
    )
    print(
        f"{'k':>3} {'policy':>13} {'peak MiB':>9} {'mem ratio':>9} {'median s':>9} "
        f"{'time ratio [IQR]':>22}"
    )
    method = ""
    for steps in steps_list:
        policies = [p for p in POLICIES if p != "truncated T=5" or steps >= 20]
        peaks = {p: peak_in_child(p, steps, args) for p in policies}
        method = str(peaks["plain"]["method"])
        fns = {p: build(p, steps, args.device) for p in policies}
        times = time_interleaved(fns, rounds, warmup=1, device=device)
        plain_peak = float(peaks["plain"]["peak_bytes"])
        for p in policies:
            q1, med, q3 = paired_ratio(times[p], times["plain"])
            seconds = sorted(times[p])[len(times[p]) // 2]
            peak = float(peaks[p]["peak_bytes"])
            print(
                f"{steps:>3} {p:>13} {peak / MiB:>9.1f} {peak / plain_peak:>9.2f} "
                f"{seconds:>9.3f} {med:>8.2f} [{q1:.2f}-{q3:.2f}]"
            )
    print(f"memory method: {method}")


if __name__ == "__main__":
    main()
