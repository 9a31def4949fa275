"""Reproducible streams: seeds, epochs, DataLoader workers, rank sharding and resume.

None of this depends on what the images show, so the synthetic Omniglot stands in for the
real one and these tests run everywhere."""

from __future__ import annotations

import pytest
import torch

from metalight.data import (
    EpisodicSampler,
    EvalTaskStream,
    Omniglot,
    TaskBatch,
    TaskDataLoader,
    TrainTaskStream,
)


@pytest.fixture(scope="module")
def sampler(synthetic_omniglot: Omniglot) -> EpisodicSampler:
    return synthetic_omniglot.with_rotations().sampler(ways=5, shots=1, queries=3)


def same(a: TaskBatch, b: TaskBatch) -> bool:
    return all(
        torch.equal(getattr(a, f), getattr(b, f))
        for f in ("support_x", "support_y", "query_x", "query_y", "info")
    )


def same_stream(a: list[TaskBatch], b: list[TaskBatch]) -> bool:
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))


def test_same_seed_same_tasks_different_seed_different_tasks(sampler: EpisodicSampler) -> None:
    first = list(TrainTaskStream(sampler, 4, 3, seed=7))
    second = list(TrainTaskStream(sampler, 4, 3, seed=7))
    other = list(TrainTaskStream(sampler, 4, 3, seed=8))
    assert same_stream(first, second)
    assert not any(torch.equal(a.info, b.info) for a, b in zip(first, other, strict=True))
    # Tasks within a meta-batch differ too.
    assert len({tuple(t.info.tolist()) for t in first[0]}) == 4


def test_epochs_differ_and_set_epoch_replays(sampler: EpisodicSampler) -> None:
    stream = TrainTaskStream(sampler, 4, 2, seed=0)
    epoch0 = list(stream)
    epoch1 = list(stream)  # a second pass is the next epoch
    assert stream.state_dict() == {"epoch": 1, "next_batch": 2}
    assert not torch.equal(epoch0[0].info, epoch1[0].info)
    stream.set_epoch(0)
    assert same_stream(list(stream), epoch0)
    stream.set_epoch(1)
    assert same_stream(list(stream), epoch1)


def test_workers_give_the_single_process_stream(sampler: EpisodicSampler) -> None:
    reference = list(TaskDataLoader(TrainTaskStream(sampler, 4, 7, seed=3), num_workers=0))
    stream = TrainTaskStream(sampler, 4, 7, seed=3)
    with_workers = list(TaskDataLoader(stream, num_workers=2))
    assert same_stream(with_workers, reference)
    assert stream.state_dict() == {"epoch": 0, "next_batch": 7}
    # The next pass (epoch 1) matches too.
    reference_next = [TrainTaskStream(sampler, 4, 7, seed=3).batch(1, s) for s in range(7)]
    assert same_stream(list(TaskDataLoader(stream, num_workers=2)), reference_next)

    evaluation = EvalTaskStream(sampler, num_episodes=30, meta_batch_size=4, split="test")
    assert same_stream(
        list(TaskDataLoader(evaluation, num_workers=2)), list(TaskDataLoader(evaluation))
    )


def test_ranks_split_the_global_meta_batch(sampler: EpisodicSampler) -> None:
    single = TrainTaskStream(sampler, 6, 3, seed=5)
    ranks = [TrainTaskStream(sampler, 6, 3, seed=5, rank=r, world_size=2) for r in range(2)]
    per_rank = [list(stream) for stream in ranks]
    assert all(len(batches) == 3 for batches in per_rank)  # same number of meta-batches
    for step, full in enumerate(single):
        parts = [per_rank[r][step] for r in range(2)]
        assert all(len(p) == 3 for p in parts)
        # Contiguous slices [0, 3) and [3, 6) of the single-process meta-batch.
        assert same(TaskBatch.stack([*parts[0], *parts[1]]), full)
        assert not torch.equal(parts[0].info, parts[1].info)
    # Three ranks see the same global batch too.
    three = [
        TrainTaskStream(sampler, 6, 3, seed=5, rank=r, world_size=3).batch(0, 1) for r in range(3)
    ]
    assert same(TaskBatch.stack([t for part in three for t in part]), single.global_batch(0, 1))


def test_eval_episodes_are_dealt_round_robin(sampler: EpisodicSampler) -> None:
    full = EvalTaskStream(sampler, num_episodes=20, meta_batch_size=4, split="val")
    episodes = [task for batch in full for task in batch]
    assert len(episodes) == 20
    ranks = [
        EvalTaskStream(
            sampler, num_episodes=20, meta_batch_size=4, split="val", rank=r, world_size=2
        )
        for r in range(2)
    ]
    seen: dict[int, object] = {}
    for r, stream in enumerate(ranks):
        assert stream.episodes == list(range(r, 20, 2))
        batches = list(stream)
        assert len(batches) == full.num_batches == 5 and all(len(b) == 2 for b in batches)
        for index, task in zip(stream.episodes, (t for b in batches for t in b), strict=True):
            assert index not in seen
            seen[index] = task
            assert torch.equal(task.query_x, episodes[index].query_x)
            assert torch.equal(task.info, episodes[index].info)
    assert sorted(seen) == list(range(20))


def test_eval_episodes_are_fixed_and_split_specific(sampler: EpisodicSampler) -> None:
    val = list(EvalTaskStream(sampler, 8, 4, split="val"))
    assert same_stream(val, list(EvalTaskStream(sampler, 8, 4, split="val")))
    test = list(EvalTaskStream(sampler, 8, 4, split="test"))
    assert not torch.equal(val[0].info, test[0].info)
    # Batching does not change which episodes are drawn.
    regrouped = list(EvalTaskStream(sampler, 8, 8, split="val"))
    assert torch.equal(regrouped[0].info, torch.cat([b.info for b in val]))


def test_indivisible_sizes_are_rejected(sampler: EpisodicSampler) -> None:
    with pytest.raises(
        ValueError, match="meta_batch_size=5 is global and must split evenly over world_size=2"
    ):
        TrainTaskStream(sampler, 5, 3, rank=0, world_size=2)
    with pytest.raises(ValueError, match="num_episodes=601 must be divisible by world_size=2"):
        EvalTaskStream(sampler, 601, 4, rank=0, world_size=2)
    with pytest.raises(ValueError, match="meta_batch_size=3 must be divisible by world_size=2"):
        EvalTaskStream(sampler, 600, 3, rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"rank must lie in \[0, world_size=2\)"):
        TrainTaskStream(sampler, 4, 3, rank=2, world_size=2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_the_same_stream(sampler: EpisodicSampler, num_workers: int) -> None:
    uninterrupted = [
        TrainTaskStream(sampler, 4, 6, seed=1).batch(e, s) for e in (0, 1) for s in range(6)
    ]

    stream = TrainTaskStream(sampler, 4, 6, seed=1)
    loader = TaskDataLoader(stream, num_workers=num_workers)
    seen = []
    for batch in loader:
        seen.append(batch)
        if len(seen) == 4:
            break
    state = stream.state_dict()
    assert state == {"epoch": 0, "next_batch": 4}

    resumed = TrainTaskStream(sampler, 4, 6, seed=1)
    resumed.load_state_dict(state)
    resumed_loader = TaskDataLoader(resumed, num_workers=num_workers)
    seen += list(resumed_loader)  # rest of epoch 0
    seen += list(resumed_loader)  # epoch 1
    assert same_stream(seen, uninterrupted)

    with pytest.raises(ValueError, match="invalid stream position"):
        resumed.load_state_dict({"epoch": 0, "next_batch": 7})


def test_persistent_workers_are_refused(sampler: EpisodicSampler) -> None:
    with pytest.raises(ValueError, match="persistent_workers=True is not supported"):
        TaskDataLoader(TrainTaskStream(sampler, 4, 2), num_workers=1, persistent_workers=True)
