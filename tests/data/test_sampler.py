"""Episodic N-way K-shot sampling: shapes, labels, class use and validation errors.

Sampling does not depend on what the images show: the synthetic Omniglot (26 classes of 20
drawers, read by the real Omniglot code) stands in for the real one."""

from __future__ import annotations

import pytest
import torch

from metalight.data import EpisodicSampler, FewShotDataset, Omniglot
from tests.conftest import SYNTHETIC_CLASSES


def _owner_classes(dataset: FewShotDataset, x: torch.Tensor) -> list[set[int]]:
    """For each image in x, the classes of the dataset holding an identical image."""
    owners: dict[bytes, set[int]] = {}
    for image, label in zip(dataset.data, dataset.targets.tolist(), strict=True):
        owners.setdefault(bytes(image.flatten().tolist()), set()).add(label)
    as_uint8 = (x * 255).round().to(torch.uint8)
    return [owners.get(bytes(image.flatten().tolist()), set()) for image in as_uint8]


@pytest.mark.parametrize(("ways", "shots", "queries"), [(5, 1, 15), (20, 5, 5), (3, 2, 1)])
def test_shapes_labels_and_classes(
    synthetic_omniglot: Omniglot, ways: int, shots: int, queries: int
) -> None:
    sampler = synthetic_omniglot.sampler(ways, shots, queries)
    generator = torch.Generator().manual_seed(123)
    for _ in range(3):
        task = sampler.sample(generator)
        assert task.support_x.shape == (ways * shots, 1, 28, 28)
        assert task.query_x.shape == (ways * queries, 1, 28, 28)
        assert task.support_x.dtype == task.query_x.dtype == torch.float32
        assert task.support_y.dtype == task.query_y.dtype == torch.int64
        # Ordered by way, each label exactly K (support) / Q (query) times.
        assert torch.equal(task.support_y, torch.arange(ways).repeat_interleave(shots))
        assert torch.equal(task.query_y, torch.arange(ways).repeat_interleave(queries))
        assert torch.equal(
            torch.bincount(task.query_y, minlength=ways), torch.full((ways,), queries)
        )
        # N distinct original classes, none shared between two ways.
        assert task.info.shape == (ways,) and len(set(task.info.tolist())) == ways
        # Every image comes from the class its way stands for.
        for x, y in ((task.support_x, task.support_y), (task.query_x, task.query_y)):
            owners = _owner_classes(synthetic_omniglot, x)
            for label, owner in zip(y.tolist(), owners, strict=True):
                assert int(task.info[label]) in owner


def test_items_drawn_without_replacement_and_ways_in_random_order() -> None:
    # Item value = its index, so the drawn indices can be read back.
    data = torch.arange(60, dtype=torch.float32).view(60, 1)
    ds = FewShotDataset(data, torch.arange(6).repeat_interleave(10))
    sampler = ds.sampler(ways=6, shots=3, queries=7)
    generator = torch.Generator().manual_seed(0)
    orders = set()
    for _ in range(20):
        task = sampler.sample(generator)
        support = task.support_x.view(6, 3).long()
        query = task.query_x.view(6, 7).long()
        for way in range(6):
            items = torch.cat([support[way], query[way]])
            assert len(set(items.tolist())) == 10  # the whole class, each item once
            assert set((items // 10).tolist()) == {int(task.info[way])}
        orders.add(tuple(task.info.tolist()))
    assert len(orders) > 10  # relabelling order varies between tasks


def test_mapping_input_and_uneven_class_sizes() -> None:
    data = torch.arange(100, dtype=torch.float32).view(100, 1)
    sampler = EpisodicSampler(
        {7: range(0, 5), 9: range(5, 50), 11: torch.arange(50, 53)},
        data.__getitem__,
        ways=3,
        shots=1,
        queries=2,
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        task = sampler.sample(generator)
        assert sorted(task.info.tolist()) == [7, 9, 11]
        lows = {7: 0, 9: 5, 11: 50}
        highs = {7: 5, 9: 50, 11: 53}
        values = torch.cat([task.support_x.view(3, 1), task.query_x.view(3, 2)], dim=1)
        for way, class_id in enumerate(task.info.tolist()):
            row = values[way].long().tolist()
            assert len(set(row)) == 3
            assert all(lows[class_id] <= v < highs[class_id] for v in row)


def test_too_many_ways(synthetic_omniglot: Omniglot) -> None:
    n = SYNTHETIC_CLASSES
    with pytest.raises(
        ValueError, match=f"cannot draw {n + 1}-way tasks from a dataset with {n} classes"
    ):
        synthetic_omniglot.sampler(ways=n + 1, shots=1, queries=1)
    assert synthetic_omniglot.sampler(ways=n, shots=1, queries=1).num_classes == n


def test_too_few_images_names_the_class(synthetic_omniglot: Omniglot) -> None:
    with pytest.raises(
        ValueError, match=rf"{SYNTHETIC_CLASSES} class\(es\) have fewer than shots \+ queries"
    ) as err:
        synthetic_omniglot.sampler(ways=5, shots=6, queries=15)
    assert "'Balinese/character01' has 20" in str(err.value)
    small = FewShotDataset(torch.zeros(7, 1), [0, 0, 0, 0, 0, 1, 1], ["cats", "dogs"])
    with pytest.raises(ValueError, match="'dogs' has 2") as err:
        small.sampler(ways=2, shots=1, queries=2)
    assert "'cats'" not in str(err.value)


@pytest.mark.parametrize("field", ["ways", "shots", "queries"])
def test_non_positive_numbers(synthetic_omniglot: Omniglot, field: str) -> None:
    settings = {"ways": 5, "shots": 1, "queries": 1, field: 0}
    with pytest.raises(ValueError, match=f"{field} must be a positive integer, got 0"):
        synthetic_omniglot.sampler(**settings)
