"""Measures Omniglot decoding and episodic sampling speed.

Run from the repository root::

    python benchmarks/bench_sampling.py
    python benchmarks/bench_sampling.py --root data/omniglot --sets images_background

By default it reads the small Omniglot sets from ``../shared/data/omniglot`` beside the
repository. It prints the decode time and episodes per second for 5-way 1-shot tasks with
15 queries, drawn (a) from one generator, (b) each from its own seeded generator as the
streams do, and (c) as meta-batches of a training stream. Not a test: numbers depend on the
machine and its load.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from metalight.data import Omniglot, TrainTaskStream, draw_task

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
SMALL_SETS = ["images_background_small1", "images_background_small2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--sets", nargs="+", default=SMALL_SETS)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--meta-batch-size", type=int, default=32)
    parser.add_argument("--no-rotations", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    args = parser.parse_args()

    start = time.perf_counter()
    dataset = Omniglot(args.root, args.sets, image_size=args.image_size)
    decode_s = time.perf_counter() - start
    print(f"decode: {len(dataset)} images, {dataset.num_classes} classes in {decode_s:.2f} s")
    if not args.no_rotations:
        dataset = dataset.with_rotations()
    print(f"dataset: {dataset}")
    sampler = dataset.sampler(args.ways, args.shots, args.queries)
    n = args.episodes
    print(
        f"task: {args.ways}-way {args.shots}-shot, {args.queries} queries; "
        f"torch threads: {torch.get_num_threads()}"
    )

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    generator = torch.Generator().manual_seed(0)
    t = best(lambda: [sampler.sample(generator) for _ in range(n)])
    print(f"one generator:      {n} episodes in {t:.3f} s = {n / t:,.0f} episodes/s")

    t = best(lambda: [draw_task(sampler, 0, "train", 0, i) for i in range(n)])
    print(f"seeded per task:    {n} episodes in {t:.3f} s = {n / t:,.0f} episodes/s")

    batches = max(1, n // args.meta_batch_size)
    stream = TrainTaskStream(sampler, args.meta_batch_size, batches)
    total = batches * args.meta_batch_size
    t = best(lambda: [stream.batch(0, s) for s in range(batches)])
    print(
        f"train meta-batches: {total} episodes ({batches} x {args.meta_batch_size}) in "
        f"{t:.3f} s = {total / t:,.0f} episodes/s"
    )


if __name__ == "__main__":
    main()
