"""DataModules: loaders per split, shapes, counts, rank sharding, state, plain kwargs.

The Omniglot ones read the synthetic small sets (26 classes in the real sets' alphabets, see
tests/conftest.py) through the real reader: their subject is plumbing, not the images."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from metalight.data import (
    EpisodicDataModule,
    ImageFolderDataModule,
    Omniglot,
    OmniglotDataModule,
    SinusoidDataModule,
    TaskBatch,
    TaskDataLoader,
)
from tests.conftest import SMALL_SETS
from tests.data.test_image_folder import make_folder


def fake_trainer(rank: int, world_size: int) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, world_size=world_size)


def test_omniglot_datamodule_from_plain_kwargs(
    synthetic_omniglot_dir: Path, synthetic_omniglot_cache: Path
) -> None:
    dm = OmniglotDataModule(
        root=str(synthetic_omniglot_dir),
        sets=list(SMALL_SETS),
        cache_dir=str(synthetic_omniglot_cache),  # decoded once per session by the fixture
        num_train_characters=12,
        num_val_characters=7,
        ways=5,
        shots=1,
        queries=15,
        eval_shots=5,
        eval_queries=5,
        meta_batch_size=4,
        train_batches_per_epoch=3,
        val_episodes=10,
        test_episodes=6,
        eval_meta_batch_size=4,
    )
    dm.prepare_data()
    dm.setup("fit")
    assert dm.datasets is not None
    train, val, test = (dm.datasets[s] for s in ("train", "val", "test"))
    assert (train.num_classes, val.num_classes, test.num_classes) == (4 * 12, 7, 7)
    base_names = {n.split("@")[0] for n in train.class_names}
    assert not base_names & set(val.class_names) and not base_names & set(test.class_names)

    loader = dm.train_dataloader()
    assert isinstance(loader, TaskDataLoader) and loader.batch_size is None
    batches = list(loader)
    assert len(batches) == 3
    for batch in batches:
        assert isinstance(batch, TaskBatch) and len(batch) == 4
        assert batch.support_x.shape == (4, 5, 1, 28, 28)
        assert batch.query_x.shape == (4, 75, 1, 28, 28)
        assert batch.support_y.shape == (4, 5) and batch.info.shape == (4, 5)

    val_batches = list(dm.val_dataloader())
    assert [len(b) for b in val_batches] == [4, 4, 2]
    assert val_batches[0].support_x.shape == (4, 25, 1, 28, 28)
    assert val_batches[0].query_x.shape == (4, 25, 1, 28, 28)
    assert [len(b) for b in dm.test_dataloader()] == [4, 2]


def test_episodic_datamodule_ranks_seeds_and_state(synthetic_omniglot: Omniglot) -> None:
    splits = synthetic_omniglot.split_by_character(num_train=12, num_val=7)
    settings = dict(
        ways=5,
        shots=1,
        queries=2,
        meta_batch_size=4,
        train_batches_per_epoch=3,
        val_episodes=8,
        eval_meta_batch_size=4,
    )

    def build(seed: int = 0) -> EpisodicDataModule:
        return EpisodicDataModule(
            splits.train.with_rotations(), splits.val, splits.test, seed=seed, **settings
        )

    single = build()
    assert single.rank_and_world_size == (0, 1)
    full_train = list(single.train_dataloader())
    full_val = list(single.val_dataloader())

    shards = []
    for rank in range(2):
        dm = build()
        dm.trainer = fake_trainer(rank, 2)
        shards.append((list(dm.train_dataloader()), list(dm.val_dataloader())))
    for step, batch in enumerate(full_train):
        parts = [shards[r][0][step] for r in range(2)]
        assert [len(p) for p in parts] == [2, 2]
        assert torch.equal(torch.cat([p.info for p in parts]), batch.info)
        assert torch.equal(torch.cat([p.query_x for p in parts]), batch.query_x)
    val_tasks = [t for b in full_val for t in b]
    for rank in range(2):
        rank_tasks = [t for b in shards[rank][1] for t in b]
        assert [t.info.tolist() for t in rank_tasks] == [
            t.info.tolist() for t in val_tasks[rank::2]
        ]

    # Validation does not depend on the training seed; training does.
    other = build(seed=1)
    assert all(
        torch.equal(a.info, b.info) for a, b in zip(full_val, other.val_dataloader(), strict=True)
    )
    assert not torch.equal(next(iter(other.train_dataloader())).info, full_train[0].info)

    # State: the position of the training stream, restored into a fresh DataModule.
    dm = build()
    loader = dm.train_dataloader()
    iterator = iter(loader)
    first = [next(iterator), next(iterator)]
    state = dm.state_dict()
    stream = {"seed": 0, "meta_batch_size": 4, "train_batches_per_epoch": 3}
    assert state == {"epoch": 0, "next_batch": 2, "stream": stream}
    resumed = build()
    resumed.load_state_dict(state)
    rest = list(resumed.train_dataloader())
    assert len(rest) == 1 and torch.equal(rest[0].info, full_train[2].info)
    assert torch.equal(first[1].info, full_train[1].info)
    assert resumed.state_dict() == {"epoch": 0, "next_batch": 3, "stream": stream}
    # A stream of another seed is not resumed from this one's position.
    with pytest.raises(ValueError, match="drawn with seed=0, this run has seed=1"):
        build(seed=1).load_state_dict(state)


def test_world_size_must_divide_meta_batch(synthetic_omniglot: Omniglot) -> None:
    dm = EpisodicDataModule(synthetic_omniglot, ways=5, shots=1, queries=1, meta_batch_size=5)
    dm.trainer = fake_trainer(0, 2)
    with pytest.raises(ValueError, match="meta_batch_size=5 is global and must split evenly"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="EpisodicDataModule has no val split"):
        dm.val_dataloader()


def test_datamodule_reports_bad_settings(synthetic_omniglot: Omniglot) -> None:
    data = synthetic_omniglot
    dm = EpisodicDataModule(data, data, ways=5, shots=1, queries=1, eval_ways=30)
    with pytest.raises(
        ValueError, match="val split: cannot draw 30-way tasks from a dataset with 26"
    ):
        dm.setup("fit")
    with pytest.raises(ValueError, match="meta_batch_size must be a positive integer, got 0"):
        EpisodicDataModule(data, meta_batch_size=0)


def test_sinusoid_datamodule() -> None:
    dm = SinusoidDataModule(
        shots=5,
        queries=7,
        eval_query_grid=True,
        meta_batch_size=8,
        train_batches_per_epoch=4,
        val_episodes=20,
        test_episodes=12,
        eval_meta_batch_size=10,
    )
    train = list(dm.train_dataloader())
    assert len(train) == 4
    assert train[0].support_x.shape == (8, 5, 1) and train[0].query_y.shape == (8, 7, 1)
    assert train[0].info.shape == (8, 2)
    val = list(dm.val_dataloader())
    assert [len(b) for b in val] == [10, 10]
    assert val[0].query_x.shape == (10, 100, 1)
    assert [len(b) for b in dm.test_dataloader()] == [10, 2]


def test_image_folder_datamodule(tmp_path: Path) -> None:
    train_root = make_folder(tmp_path / "train", classes=3, per_class=4)
    val_root = make_folder(tmp_path / "val", classes=2, per_class=4)
    dm = ImageFolderDataModule(
        train_root,
        val_root,
        image_size=12,
        channels=1,
        ways=2,
        shots=1,
        queries=3,
        meta_batch_size=2,
        train_batches_per_epoch=2,
        val_episodes=4,
        num_workers=0,
    )
    assert [b.support_x.shape for b in dm.train_dataloader()] == [(2, 2, 1, 12, 12)] * 2
    assert [len(b) for b in dm.val_dataloader()] == [2, 2]
    with pytest.raises(ValueError, match="ImageFolderDataModule has no test split"):
        dm.test_dataloader()


class _RecordingModule(pl.LightningModule):
    """Records which tasks reach training_step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[list[float]] = []

    def training_step(self, batch: TaskBatch, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch.info[:, 0].tolist())
        return self.layer(batch.support_x).pow(2).mean()

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _SaveAtStep(pl.Callback):
    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_lightning_resume_mid_epoch_sees_the_uninterrupted_stream(
    tmp_path: Path, num_workers: int
) -> None:
    def datamodule() -> SinusoidDataModule:
        return SinusoidDataModule(
            meta_batch_size=2, train_batches_per_epoch=5, num_workers=num_workers
        )

    options = dict(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
    )
    full = _RecordingModule()
    pl.Trainer(max_epochs=2, enable_checkpointing=False, **options).fit(full, datamodule())

    # Lightning fetches one batch ahead; the checkpoint must not count it as used.
    # Save where ModelCheckpoint(every_n_train_steps=3) would: at the end of a training batch.
    path = tmp_path / "step3.ckpt"
    first = _RecordingModule()
    save = _SaveAtStep(3, path)
    pl.Trainer(max_steps=3, enable_checkpointing=False, callbacks=[save], **options).fit(
        first, datamodule()
    )
    second = _RecordingModule()
    pl.Trainer(max_epochs=2, enable_checkpointing=False, **options).fit(
        second, datamodule(), ckpt_path=path
    )
    assert len(full.seen) == 10
    assert first.seen + second.seen == full.seen


def test_hydra_instantiates_datamodules(
    synthetic_omniglot_dir: Path, synthetic_omniglot_cache: Path
) -> None:
    hydra_utils = pytest.importorskip("hydra.utils")
    omegaconf = pytest.importorskip("omegaconf")
    config = omegaconf.OmegaConf.create(
        {
            "_target_": "metalight.data.OmniglotDataModule",
            "root": str(synthetic_omniglot_dir),
            "sets": list(SMALL_SETS),
            "cache_dir": str(synthetic_omniglot_cache),
            "split": "alphabet",
            "train_alphabets": ["Korean", "Japanese_(katakana)", "Sanskrit", "Balinese"],
            "val_alphabets": ["Greek", "Tagalog"],
            "test_alphabets": ["Latin", "Early_Aramaic"],
            "ways": 5,
            "shots": 1,
            "queries": 2,
            "meta_batch_size": 2,
            "train_batches_per_epoch": 2,
            "val_episodes": 4,
        }
    )
    dm = hydra_utils.instantiate(config)
    assert isinstance(dm, OmniglotDataModule)
    assert next(iter(dm.train_dataloader())).support_x.shape == (2, 5, 1, 28, 28)
    assert dm.datasets is not None and dm.datasets["val"].num_classes == 3 + 2  # Greek + Tagalog
    sinusoid = hydra_utils.instantiate(
        omegaconf.OmegaConf.create(
            {"_target_": "metalight.data.SinusoidDataModule", "x_range": [-2.0, 2.0], "shots": 3}
        )
    )
    batch = next(iter(sinusoid.train_dataloader()))
    assert batch.support_x.shape == (25, 3, 1) and float(batch.support_x.abs().max()) <= 2.0
