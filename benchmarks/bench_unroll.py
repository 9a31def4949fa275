"""Long unrolls: peak memory and time of the plain, checkpointed and truncated unrolls.

One Conv-4 MAML meta-iteration (5-way 1-shot, 15 queries per class, 28x28, one task, inner
SGD lr 0.4, second order) for k = 1, 5, 10, 20, 50 inner steps, each configuration in a
fresh subprocess so that peak memory is its own:

- on CPU, peak memory is the rise of the process's peak RSS during the measured iteration;
- on CUDA, ``torch.cuda.max_memory_allocated`` over the iteration.

Ratios are against the plain unroll measured in the same run. Targets (issue "Long
unrolls"): at k = 50 the checkpointed unroll uses at most a third of the plain unroll's
peak memory at no more than 1.5x its time; the truncated unroll (T = 5) costs about what
5 second-order steps cost.

Usage:
    python benchmarks/bench_unroll.py [--quick] [--device cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(policy: str, steps: int, device: str, threads: int, repeats: int) -> dict:
    """Run one configuration in this process and return peak memory (MiB) and time (s)."""
    import functools
    import resource
    import statistics
    import time

    import torch

    from metalight.algorithms import MAML
    from metalight.data import Task, TaskBatch
    from metalight.models import Conv4

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    options = {
        "plain": {},
        "checkpointed": {"checkpoint_unroll": True},
        "truncated": {"truncate": 5},
    }[policy]
    module = MAML(
        Conv4(hidden=64),
        inner_optim=functools.partial(torch.optim.SGD, lr=0.4),
        inner_steps=steps,
        **options,
    ).to(device)
    ways = torch.arange(5)
    task = Task(
        torch.randn(5, 1, 28, 28),
        ways,
        torch.randn(75, 1, 28, 28),
        ways.repeat_interleave(15),
        ways,
    )
    batch = TaskBatch.stack([task]).to(device)

    def iteration() -> None:
        module.zero_grad(set_to_none=True)
        module.training_step(batch, 0).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        iteration()  # warm-up: kernels, allocator
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        iteration()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        # The first iteration is the measured one: RSS peaks never go down.
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        iteration()
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        iteration()
        times.append(time.perf_counter() - start)
    return {"peak_mib": peak, "seconds": statistics.median(times)}


def run_child(policy: str, steps: int, device: str, threads: int, repeats: int) -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            policy,
            str(steps),
            device,
            str(threads),
            str(repeats),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="k = 5 and 20 only, 1 repeat")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        policy, steps, device, threads, repeats = args.child
        print(json.dumps(measure(policy, int(steps), device, int(threads), int(repeats))))
        return
    steps_list = [5, 20] if args.quick else [1, 5, 10, 20, 50]
    repeats = 1 if args.quick else 3
    print(
        f"Conv-4 MAML meta-iteration, 5-way 1-shot, 1 task, device={args.device}, "
        f"threads={args.threads}, median of {repeats} timed iterations"
    )
    print(
        f"{'k':>3} {'policy':>13} {'peak MiB':>9} {'time s':>8} {'mem ratio':>9} {'time ratio':>10}"
    )
    for steps in steps_list:
        plain = run_child("plain", steps, args.device, args.threads, repeats)
        rows = [
            ("plain", plain),
            ("checkpointed", run_child("checkpointed", steps, args.device, args.threads, repeats)),
        ]
        if steps >= 20:
            rows.append(
                ("truncated T=5", run_child("truncated", steps, args.device, args.threads, repeats))
            )
        for name, result in rows:
            print(
                f"{steps:>3} {name:>13} {result['peak_mib']:>9.1f} {result['seconds']:>8.3f} "
                f"{result['peak_mib'] / max(plain['peak_mib'], 1e-9):>9.2f} "
                f"{result['seconds'] / plain['seconds']:>10.2f}"
            )


if __name__ == "__main__":
    main()
