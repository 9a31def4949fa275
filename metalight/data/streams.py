"""Reproducible, rank- and worker-sharded streams of meta-batches.

Every task is drawn from its own ``torch.Generator`` seeded by :func:`derive_seed` from
``(seed, split, epoch, task index)``, so which tasks a run sees never depends on the number of
DataLoader workers, on resuming, or on the number of processes.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from metalight.data._threads import single_threaded
from metalight.data._validation import check_positive
from metalight.data.sampler import TaskSampler
from metalight.data.task import Task, TaskBatch

__all__ = [
    "DEFAULT_EVAL_SEED",
    "EvalTaskStream",
    "TaskDataLoader",
    "TrainTaskStream",
    "derive_seed",
    "draw_task",
    "seed_worker",
]

# Evaluation episodes come from this seed unless told otherwise, whatever the training seed,
# so that every run is scored on the same tasks.
DEFAULT_EVAL_SEED = 20_240_601


def derive_seed(*parts: int | str) -> int:
    """Hashes ints and strings into a 63-bit seed, stable across processes and Python runs.

    Example:
        >>> derive_seed(0, "train", 0, 5) == derive_seed(0, "train", 0, 5)
        True
    """
    blob = repr(tuple(parts)).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") >> 1


def draw_task(sampler: TaskSampler, seed: int, split: str, epoch: int, index: int) -> Task:
    """Draws task ``index`` of ``(seed, split, epoch)``: a pure function of its arguments."""
    generator = torch.Generator().manual_seed(derive_seed(seed, split, epoch, index))
    return sampler.sample(generator)


def _check_rank(rank: int, world_size: int) -> None:
    check_positive(world_size=world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}.")


def _worker_steps(start: int, stop: int) -> range:
    """Steps of this DataLoader worker: the loader's round-robin then yields them in order."""
    info = get_worker_info()
    if info is None:
        return range(start, stop)
    return range(start + info.id, stop, info.num_workers)


class TrainTaskStream(IterableDataset[TaskBatch]):
    """An epoch of training meta-batches, sharded over ranks and DataLoader workers.

    Meta-batch ``s`` of epoch ``e`` is the global batch of tasks ``s*B .. s*B+B-1`` (``B`` the
    global ``meta_batch_size``); rank ``r`` of ``W`` yields the contiguous slice
    ``[r*B/W, (r+1)*B/W)`` of it, so the union over ranks is the same for every world size.
    Worker ``w`` of ``n`` yields steps ``start + w, start + w + n, ...``, which the DataLoader
    interleaves back into step order.

    Each pass over the stream is one epoch: a new pass starts the next epoch, except right
    after :meth:`set_epoch` or :meth:`load_state_dict`, which resume at the stored position.
    The position advances as batches are handed out; with DataLoader workers, iterate through
    :class:`TaskDataLoader` so the position is kept in the main process.

    Args:
        sampler: Draws one task from a generator.
        meta_batch_size: Global number of tasks per meta-batch (over all ranks).
        num_batches: Meta-batches per epoch.
        seed: Training seed.
        split: Name mixed into the task seeds (keeps streams of different splits apart).
        rank: This process's rank.
        world_size: Number of processes.

    Raises:
        ValueError: If ``meta_batch_size`` is not divisible by ``world_size`` or a number is
            not positive.

    Example:
        >>> from metalight.data import SinusoidTasks
        >>> stream = TrainTaskStream(SinusoidTasks(shots=5), meta_batch_size=4, num_batches=3)
        >>> [b.support_x.shape[0] for b in stream]
        [4, 4, 4]
        >>> stream.state_dict()
        {'epoch': 0, 'next_batch': 3}
    """

    def __init__(
        self,
        sampler: TaskSampler,
        meta_batch_size: int,
        num_batches: int,
        *,
        seed: int = 0,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        check_positive(meta_batch_size=meta_batch_size, num_batches=num_batches)
        _check_rank(rank, world_size)
        if meta_batch_size % world_size:
            raise ValueError(
                f"meta_batch_size={meta_batch_size} is global and must split evenly over "
                f"world_size={world_size} processes; choose a multiple of {world_size} "
                f"(e.g. {(meta_batch_size // world_size + 1) * world_size})."
            )
        self.sampler = sampler
        self.meta_batch_size = meta_batch_size
        self.num_batches = num_batches
        self.seed = seed
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.next_batch = 0
        # True until a pass starts; then the next pass moves on to a new epoch.
        self._resume = True

    @property
    def local_batch_size(self) -> int:
        """Tasks per meta-batch on this rank."""
        return self.meta_batch_size // self.world_size

    def task(self, epoch: int, index: int) -> Task:
        """Global task ``index`` of ``epoch`` (meta-batch ``index // meta_batch_size``)."""
        return draw_task(self.sampler, self.seed, self.split, epoch, index)

    def global_batch(self, epoch: int, step: int) -> TaskBatch:
        """All ``meta_batch_size`` tasks of meta-batch ``step``, as one process would see them."""
        first = step * self.meta_batch_size
        with single_threaded():
            tasks = [self.task(epoch, first + j) for j in range(self.meta_batch_size)]
            return TaskBatch.stack(tasks)

    def batch(self, epoch: int, step: int) -> TaskBatch:
        """This rank's slice of meta-batch ``step`` of ``epoch``."""
        first = step * self.meta_batch_size + self.rank * self.local_batch_size
        with single_threaded():
            tasks = [self.task(epoch, first + j) for j in range(self.local_batch_size)]
            return TaskBatch.stack(tasks)

    def set_epoch(self, epoch: int) -> None:
        """Makes the next pass yield epoch ``epoch`` from its first meta-batch."""
        self.epoch = int(epoch)
        self.next_batch = 0
        self._resume = True

    def state_dict(self) -> dict[str, int]:
        """The position: ``{"epoch": e, "next_batch": s}`` (``s`` not yet handed out)."""
        return {"epoch": self.epoch, "next_batch": self.next_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a position from :meth:`state_dict`; the next pass continues from it."""
        epoch, next_batch = int(state["epoch"]), int(state["next_batch"])
        if epoch < 0 or not 0 <= next_batch <= self.num_batches:
            raise ValueError(
                f"invalid stream position {state}: need epoch >= 0 and "
                f"0 <= next_batch <= num_batches={self.num_batches}."
            )
        self.epoch, self.next_batch = epoch, next_batch
        self._resume = True

    def begin_pass(self) -> tuple[int, int]:
        """Starts a pass in the main process and returns its ``(epoch, first step)``."""
        if not self._resume or self.next_batch >= self.num_batches:
            self.epoch += 1
            self.next_batch = 0
        self._resume = False
        return self.epoch, self.next_batch

    def __iter__(self) -> Iterator[TaskBatch]:
        if get_worker_info() is not None:
            # A worker's copy was taken after TaskDataLoader planned the pass in the main process.
            for step in _worker_steps(self.next_batch, self.num_batches):
                yield self.batch(self.epoch, step)
            return
        epoch, start = self.begin_pass()
        for step in range(start, self.num_batches):
            # Advance before yielding: once a batch is handed out it counts as consumed.
            self.next_batch = step + 1
            yield self.batch(epoch, step)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, meta_batch_size={self.meta_batch_size}, "
            f"num_batches={self.num_batches}, seed={self.seed}, rank={self.rank}/"
            f"{self.world_size}, epoch={self.epoch}, next_batch={self.next_batch})"
        )


class EvalTaskStream(IterableDataset[TaskBatch]):
    """A fixed list of evaluation episodes, identical in every run, sharded over ranks.

    Episode ``i`` is drawn from ``(seed, split, i)`` with a seed independent of the training
    seed. Rank ``r`` of ``W`` evaluates episodes ``r, r + W, r + 2W, ...``; they are grouped into
    meta-batches of ``meta_batch_size / W`` (so global meta-batch ``s`` covers episodes
    ``s*B .. s*B+B-1``), the last one possibly smaller. The union over ranks is every episode
    exactly once and all ranks yield the same number of meta-batches.

    Args:
        sampler: Draws one task from a generator.
        num_episodes: Number of episodes (600 is the usual protocol).
        meta_batch_size: Global episodes per meta-batch.
        seed: Evaluation seed.
        split: Split name mixed into the seeds (``"val"`` and ``"test"`` differ).
        rank: This process's rank.
        world_size: Number of processes.

    Raises:
        ValueError: If ``num_episodes`` or ``meta_batch_size`` is not divisible by
            ``world_size``, or a number is not positive.

    Example:
        >>> from metalight.data import SinusoidTasks
        >>> stream = EvalTaskStream(SinusoidTasks(), num_episodes=10, meta_batch_size=4)
        >>> [len(b) for b in stream]
        [4, 4, 2]
    """

    def __init__(
        self,
        sampler: TaskSampler,
        num_episodes: int = 600,
        meta_batch_size: int = 1,
        *,
        seed: int = DEFAULT_EVAL_SEED,
        split: str = "val",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        check_positive(num_episodes=num_episodes, meta_batch_size=meta_batch_size)
        _check_rank(rank, world_size)
        for name, value in (("num_episodes", num_episodes), ("meta_batch_size", meta_batch_size)):
            if value % world_size:
                raise ValueError(
                    f"{name}={value} must be divisible by world_size={world_size} so that "
                    f"every process evaluates the same number of episodes; choose a multiple "
                    f"of {world_size} (e.g. {(value // world_size + 1) * world_size})."
                )
        self.sampler = sampler
        self.num_episodes = num_episodes
        self.meta_batch_size = meta_batch_size
        self.seed = seed
        self.split = split
        self.rank = rank
        self.world_size = world_size

    @property
    def episodes(self) -> list[int]:
        """Episode indices of this rank, in the order they are yielded."""
        return list(range(self.rank, self.num_episodes, self.world_size))

    @property
    def num_batches(self) -> int:
        """Meta-batches per pass (the same on every rank)."""
        return -(-self.num_episodes // self.meta_batch_size)

    def episode(self, index: int) -> Task:
        """Episode ``index`` of the fixed list."""
        return draw_task(self.sampler, self.seed, self.split, 0, index)

    def batch(self, step: int) -> TaskBatch:
        """This rank's part of meta-batch ``step``."""
        local = self.meta_batch_size // self.world_size
        chunk = self.episodes[step * local : (step + 1) * local]
        with single_threaded():
            return TaskBatch.stack([self.episode(i) for i in chunk])

    def __iter__(self) -> Iterator[TaskBatch]:
        for step in _worker_steps(0, self.num_batches):
            yield self.batch(step)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, num_episodes={self.num_episodes}, "
            f"meta_batch_size={self.meta_batch_size}, seed={self.seed}, "
            f"rank={self.rank}/{self.world_size})"
        )


def seed_worker(worker_id: int) -> None:
    """Seeds Python's ``random`` in a DataLoader worker from the worker's torch seed.

    PyTorch already gives worker ``w`` the torch seed ``base_seed + w``, where
    ``base_seed`` comes from the DataLoader's generator; tasks never use these RNGs, but user
    code inside a sampler might.
    """
    random.seed(torch.initial_seed() % 2**32)


class TaskDataLoader(DataLoader):
    """A ``DataLoader(batch_size=None)`` over a task stream that keeps its position.

    With workers, each pass is planned in the main process (epoch roll-over, resume point)
    before the workers copy the stream, and the training stream's position advances as
    batches are handed out, so :meth:`TrainTaskStream.state_dict` is exact.

    Args:
        stream: A :class:`TrainTaskStream` or :class:`EvalTaskStream`.
        num_workers: Worker processes; each builds whole meta-batches.
        seed: Seeds the workers' RNGs (distinct per worker, reproducible per pass).
        pin_memory: Pin batches (for GPU transfer).
        multiprocessing_context: e.g. ``"spawn"``; ``None`` uses the platform default.
        **kwargs: Other ``DataLoader`` arguments (``timeout``, ``prefetch_factor``, ...).

    Raises:
        ValueError: If ``persistent_workers=True`` (workers would keep a stale position).

    Example:
        >>> from metalight.data import SinusoidTasks
        >>> stream = TrainTaskStream(SinusoidTasks(), meta_batch_size=2, num_batches=4)
        >>> len(list(TaskDataLoader(stream, num_workers=0)))
        4
    """

    def __init__(
        self,
        stream: TrainTaskStream | EvalTaskStream,
        *,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        multiprocessing_context: str | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("persistent_workers"):
            raise ValueError(
                "persistent_workers=True is not supported: workers would keep the stream "
                "position of the pass that created them. Leave it False."
            )
        super().__init__(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            worker_init_fn=seed_worker if num_workers > 0 else None,
            generator=torch.Generator().manual_seed(derive_seed(seed, "workers")),
            multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
            **kwargs,
        )

    def __iter__(self) -> Iterator[TaskBatch]:  # type: ignore[override]
        stream = self.dataset
        if self.num_workers == 0 or not isinstance(stream, TrainTaskStream):
            return super().__iter__()
        return self._tracked(stream)

    def _tracked(self, stream: TrainTaskStream) -> Iterator[TaskBatch]:
        _, start = stream.begin_pass()
        for step, batch in enumerate(super().__iter__(), start):
            stream.next_batch = step + 1
            yield batch
