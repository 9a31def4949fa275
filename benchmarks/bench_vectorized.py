"""Times task-vectorised adaptation against the per-task loop, in the same run.

Run from the repository root::

    python benchmarks/bench_vectorized.py              # about 15 minutes on 2 CPU cores
    python benchmarks/bench_vectorized.py --quick      # about 6 minutes: rough numbers
    python benchmarks/bench_vectorized.py --device cuda

Cases (second-order MAML, inner SGD, meta-gradient into ``.grad``; no outer step), each at
meta-batch 4 and 32:

* Conv-4 (64 filters, batch-statistics BatchNorm) on 1x28x28 images, 5-way 1-shot with 15
  queries per class, inner lr 0.4, 1 and 5 inner steps (MAML's Omniglot setting);
* the 1-40-40-1 MLP on sinusoid tasks of 10 support and 10 query points, inner lr 0.01, 1 and
  5 inner steps (MAML's regression setting).

Variants, run interleaved (every round runs each once, in alternating order):

* ``loop`` (the baseline): ``MetaLearningModule.training_step`` with ``vectorize_tasks=False``
  + backward of its surrogate,
  as Lightning runs it (one task after the other);
* ``vectorized``: ``metalight.vectorized.vectorized_meta_loss`` + backward (all tasks at
  once under ``torch.func.vmap``).

The ratio is the median of per-round ratios ``vectorized / loop`` with its interquartile range
(below 1: vectorised is faster). "faster" when the 75th percentile of the ratio is below 1,
"slower" when the 25th percentile is above 1, else "noise". Before timing, the two
meta-gradients are compared (they must agree to float32 rounding, which the unroll
amplifies: up to about 1e-3 of the largest entry). On CUDA the peak memory of
each variant is printed too (the vectorised path keeps every task's unroll graph at once).
Not a test: numbers depend on the machine and its load (printed with the results).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# The script runs from a checkout (``python benchmarks/bench_vectorized.py``).
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import _common  # noqa: E402  (this folder is sys.path[0] when the script runs)

from metalight.data import TaskBatch  # noqa: E402
from metalight.lightning import MetaLearningModule  # noqa: E402
from metalight.vectorized import vectorized_meta_loss  # noqa: E402


@dataclass
class Case:
    """One meta-iteration setting."""

    name: str
    module: MetaLearningModule
    batch: TaskBatch
    rounds: int


def build_case(model: str, tasks: int, steps: int, device: torch.device, rounds: int) -> Case:
    """The shared workload (``_common``: MAML's Omniglot or sinusoid setting) in a module.

    ``vectorize_tasks=False``: ``training_step`` must be the per-task loop (the baseline),
    which "auto" would replace by the vectorised step for models without convolutions.
    """
    if model == "conv4":
        workload = _common.conv4_case(tasks=tasks, steps=steps, device=device)
        name = f"conv4 5w1s15q x{tasks} {steps} step"
    else:
        workload = _common.mlp_case(tasks=tasks, steps=steps, device=device)
        name = f"mlp 10pt x{tasks} {steps} step"
    module = _common.make_module(workload, vectorize=False)
    assert isinstance(module, MetaLearningModule)
    return Case(name, module, workload.batch, rounds)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def zero_grad(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def variants(case: Case) -> dict[str, Callable[[], None]]:
    module, batch = case.module, case.batch

    def loop() -> None:
        module.training_step(batch, 0).backward()

    def vectorized() -> None:
        vectorized_meta_loss(module, batch).backward()

    return {"loop": loop, "vectorized": vectorized}


def check_agreement(case: Case) -> float:
    """Largest difference of the two meta-gradients, relative to the largest entry.

    TF32 is off while checking (on CUDA a grouped and a plain convolution may round
    differently in TF32); the timings use the default settings.
    """
    grads = {}
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name, fn in variants(case).items():
            zero_grad(case.module)
            fn()
            grads[name] = torch.cat([p.grad.flatten() for p in case.module.meta_parameters()])
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    zero_grad(case.module)
    scale = grads["loop"].abs().max().clamp_min(1e-12)
    error = float((grads["vectorized"] - grads["loop"]).abs().max() / scale)
    # float32 rounding grows through the unroll: for Conv-4 x32 with 5 steps of lr 0.4 the
    # loop's own meta-gradient was 1.9e-3 (relative) from the float64 one here, and the two
    # agreed to 8e-14 in float64. A real mistake shows up as errors of order 1.
    if not error < 2e-2:
        raise RuntimeError(f"{case.name}: the meta-gradients differ (relative {error:.1e})")
    return error


def peak_memory(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak CUDA memory of one call in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def time_interleaved(
    fns: dict[str, Callable[[], None]], module: nn.Module, rounds: int, device: torch.device
) -> dict[str, list[float]]:
    """Wall-clock seconds of each variant; every round runs each once, order alternating."""
    names = list(fns)
    for name in names:  # warm-up
        zero_grad(module)
        fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            zero_grad(module)
            gc.collect()
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def verdict(q1: float, q3: float) -> str:
    if q3 < 1.0:
        return "faster"
    if q1 > 1.0:
        return "slower"
    return "noise"


def describe_machine(device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"torch {torch.__version__}; device: {where}; torch threads: {torch.get_num_threads()}; "
        f"CPUs: {os.cpu_count()}; load average: {load}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="few rounds: rough numbers")
    parser.add_argument(
        "--only", choices=["conv4", "mlp"], default=None, help="run one model's cases only"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available in this torch build")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    conv_rounds = (2 if args.quick else 5) * (4 if cuda else 1)
    mlp_rounds = (5 if args.quick else 21) * (2 if cuda else 1)

    builders: list[Callable[[], Case]] = []
    for tasks in (4, 32):
        for steps in (1, 5):
            if args.only in (None, "conv4"):
                builders.append(
                    functools.partial(build_case, "conv4", tasks, steps, device, conv_rounds)
                )
    for tasks in (4, 32):
        for steps in (1, 5):
            if args.only in (None, "mlp"):
                builders.append(
                    functools.partial(build_case, "mlp", tasks, steps, device, mlp_rounds)
                )

    print(describe_machine(device))
    header = (
        f"{'case':32s} {'loop ms':>9s} {'vect ms':>9s} {'vect/loop':>9s} {'IQR':>13s} "
        f"{'verdict':>7s} {'grad err':>8s}"
    )
    if cuda:
        header += f" {'loop MiB':>9s} {'vect MiB':>9s}"
    print(header, flush=True)
    for build in builders:
        case = build()
        error = check_agreement(case)
        fns = variants(case)
        times = time_interleaved(fns, case.module, case.rounds, device)
        ratios = [v / b for v, b in zip(times["vectorized"], times["loop"])]
        q1, q2, q3 = quartiles(ratios)
        line = (
            f"{case.name:32s} {statistics.median(times['loop']) * 1e3:9.1f} "
            f"{statistics.median(times['vectorized']) * 1e3:9.1f} {q2:9.2f} "
            f"{f'[{q1:.2f}, {q3:.2f}]':>13s} {verdict(q1, q3):>7s} {error:8.1e}"
        )
        if cuda:
            memory = {}
            for name, fn in fns.items():
                zero_grad(case.module)
                memory[name] = peak_memory(fn, device)
            line += f" {memory['loop']:9.1f} {memory['vectorized']:9.1f}"
        print(line, flush=True)
        del case, fns
        gc.collect()
    print("ratio: median of per-round vectorized/loop times (IQR); below 1: vectorised faster")


if __name__ == "__main__":
    main()
