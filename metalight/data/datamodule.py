"""Lightning DataModules that serve reproducible, rank-sharded streams of meta-batches."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

from metalight.data._validation import DataArgumentError, check_positive
from metalight.data.dataset import FewShotDataset
from metalight.data.image_folder import ImageFolder
from metalight.data.mini_imagenet import MiniImageNet
from metalight.data.omniglot import OMNIGLOT_SETS, Omniglot, download_omniglot
from metalight.data.sampler import EpisodicSampler, TaskSampler
from metalight.data.sinusoid import SinusoidTasks
from metalight.data.streams import (
    DEFAULT_EVAL_SEED,
    EvalTaskStream,
    TaskDataLoader,
    TrainTaskStream,
    derive_seed,
)
from metalight.data.transforms import ImageTransform, OmniglotTransform

__all__ = [
    "EpisodicDataModule",
    "ImageFolderDataModule",
    "MiniImageNetDataModule",
    "OmniglotDataModule",
    "SinusoidDataModule",
    "TaskDataModule",
]

_SPLITS = ("train", "val", "test")


class TaskDataModule(pl.LightningDataModule):
    """Base DataModule: turns one :class:`TaskSampler` per split into task streams.

    Subclasses implement :meth:`build_samplers`. Training yields ``train_batches_per_epoch``
    meta-batches of ``meta_batch_size`` tasks (global, split over ranks) per epoch; validation
    and testing yield fixed lists of ``val_episodes`` / ``test_episodes`` episodes drawn from
    ``eval_seed``, the same in every run whatever the training ``seed``. When attached to a
    trainer, ``trainer.world_size`` and ``trainer.global_rank`` shard the streams (else 1/0).
    Loaders use ``batch_size=None`` and yield :class:`~metalight.data.task.TaskBatch`.

    The loaders define no ``len()``: Lightning warns about sized ``IterableDataset``s, and an
    epoch ends when the stream does.

    Args:
        meta_batch_size: Global tasks per training meta-batch.
        train_batches_per_epoch: Training meta-batches per epoch.
        val_episodes: Number of fixed validation episodes.
        test_episodes: Number of fixed test episodes.
        eval_meta_batch_size: Global episodes per evaluation meta-batch (default:
            ``meta_batch_size``).
        seed: Training seed.
        eval_seed: Seed of the evaluation episodes.
        num_workers: DataLoader workers per process.
        pin_memory: Pin batches for faster GPU transfer.
        multiprocessing_context: Worker start method (``"fork"``, ``"spawn"``, ...).
    """

    def __init__(
        self,
        *,
        meta_batch_size: int = 32,
        train_batches_per_epoch: int = 100,
        val_episodes: int = 600,
        test_episodes: int = 600,
        eval_meta_batch_size: int | None = None,
        seed: int = 0,
        eval_seed: int = DEFAULT_EVAL_SEED,
        num_workers: int = 0,
        pin_memory: bool = False,
        multiprocessing_context: str | None = None,
    ) -> None:
        super().__init__()
        if eval_meta_batch_size is None:
            eval_meta_batch_size = meta_batch_size
        check_positive(
            meta_batch_size=meta_batch_size,
            train_batches_per_epoch=train_batches_per_epoch,
            val_episodes=val_episodes,
            test_episodes=test_episodes,
            eval_meta_batch_size=eval_meta_batch_size,
        )
        self.meta_batch_size = meta_batch_size
        self.train_batches_per_epoch = train_batches_per_epoch
        self.val_episodes = val_episodes
        self.test_episodes = test_episodes
        self.eval_meta_batch_size = eval_meta_batch_size
        self.seed = int(seed)
        self.eval_seed = int(eval_seed)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.multiprocessing_context = multiprocessing_context
        self.samplers: dict[str, TaskSampler] | None = None
        self._train_stream: TrainTaskStream | None = None
        self._pending_state: dict[str, int] | None = None

    def build_samplers(self) -> dict[str, TaskSampler]:
        """Returns the task sampler of each split present (keys among train/val/test)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_samplers()")

    def setup(self, stage: str | None = None) -> None:
        """Builds the samplers (loading datasets) once; later calls reuse them."""
        if self.samplers is None:
            self.samplers = self.build_samplers()

    def split_names(self) -> tuple[str, ...]:
        """The splits that have data, among ``("train", "val", "test")``.

        Loads the data (once: the later ``setup`` of a Trainer reuses it), so that a run can
        learn before training whether there is anything to validate or test on.
        """
        self.setup()
        assert self.samplers is not None
        return tuple(split for split in _SPLITS if split in self.samplers)

    @property
    def transform(self) -> ImageTransform | None:
        """The transform of this data's images (``None`` for data that are not images)."""
        return None

    @property
    def rank_and_world_size(self) -> tuple[int, int]:
        """``(global_rank, world_size)`` of the attached trainer, or ``(0, 1)``."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _sampler(self, split: str) -> TaskSampler | None:
        self.setup()
        assert self.samplers is not None
        return self.samplers.get(split)

    def _loader(self, stream: TrainTaskStream | EvalTaskStream) -> TaskDataLoader:
        return TaskDataLoader(
            stream,
            num_workers=self.num_workers,
            seed=derive_seed(self.seed, stream.split, stream.rank),
            pin_memory=self.pin_memory,
            multiprocessing_context=self.multiprocessing_context,
        )

    def train_stream(self) -> TrainTaskStream:
        """The training stream of this rank, created once and kept with its position."""
        sampler = self._sampler("train")
        if sampler is None:
            raise ValueError(f"{type(self).__name__} has no train split; pass training data.")
        rank, world_size = self.rank_and_world_size
        stream = self._train_stream
        if stream is None or (stream.rank, stream.world_size) != (rank, world_size):
            new = TrainTaskStream(
                sampler,
                self.meta_batch_size,
                self.train_batches_per_epoch,
                seed=self.seed,
                split="train",
                rank=rank,
                world_size=world_size,
            )
            if stream is not None:
                new.load_state_dict(stream.state_dict())
            stream = self._train_stream = new
        if self._pending_state is not None:
            stream.load_state_dict(self._pending_state)
            self._pending_state = None
        return stream

    def eval_stream(self, split: str) -> EvalTaskStream | None:
        """The fixed-episode stream of ``"val"`` or ``"test"`` for this rank, if present."""
        sampler = self._sampler(split)
        if sampler is None:
            return None
        rank, world_size = self.rank_and_world_size
        return EvalTaskStream(
            sampler,
            self.val_episodes if split == "val" else self.test_episodes,
            self.eval_meta_batch_size,
            seed=self.eval_seed,
            split=split,
            rank=rank,
            world_size=world_size,
        )

    def train_dataloader(self) -> TaskDataLoader:
        """Loader of this rank's training meta-batches; each pass is one epoch."""
        return self._loader(self.train_stream())

    def val_dataloader(self) -> TaskDataLoader:
        """Loader of this rank's validation episodes.

        Raises:
            ValueError: If there is no validation split.
        """
        return self._loader(self._required_eval_stream("val"))

    def test_dataloader(self) -> TaskDataLoader:
        """Loader of this rank's test episodes.

        Raises:
            ValueError: If there is no test split.
        """
        return self._loader(self._required_eval_stream("test"))

    def _required_eval_stream(self, split: str) -> EvalTaskStream:
        stream = self.eval_stream(split)
        if stream is None:
            hint = "Trainer(limit_val_batches=0)" if split == "val" else "not calling test"
            raise DataArgumentError(
                f"{type(self).__name__} has no {split} split; pass {split} data, or skip it "
                f"({hint}).",
                {"limit_val_batches": 0} if split == "val" else {},
            )
        return stream

    def state_dict(self) -> dict[str, Any]:
        """The training stream position ``{"epoch", "next_batch"}`` (world-size independent)
        and, under ``"stream"``, the settings that define the stream (seed, meta-batch size,
        batches per epoch), so that a resume with other settings is refused.

        Batches that Lightning has fetched ahead but not yet trained on are not counted, so a
        run resumed from a mid-epoch checkpoint sees exactly the batches it had not used.
        """
        if self._train_stream is None:
            state = dict(self._pending_state or {"epoch": 0, "next_batch": 0})
        else:
            state = self._train_stream.state_dict()
            fetcher = self._train_fetcher()
            if fetcher is not None:
                state["next_batch"] = max(0, state["next_batch"] - self._prefetched(fetcher))
            elif (trained := self._trained_in_epoch()) is not None:
                # After fit() returns the fetcher is gone, and with it the count of batches
                # it had fetched ahead: the fit loop's own progress says what was trained.
                state["next_batch"] = min(state["next_batch"], trained)
        return {**state, "stream": self._stream_settings()}

    def _stream_settings(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "meta_batch_size": self.meta_batch_size,
            "train_batches_per_epoch": self.train_batches_per_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the training stream position; applied when the stream is (re)built.

        Raises:
            ValueError: the checkpoint's stream was made with another seed, meta-batch size
                or number of batches per epoch (the resumed run would silently train on
                other tasks than an uninterrupted one).
        """
        saved = state_dict.get("stream")
        if isinstance(saved, dict):
            current = self._stream_settings()
            changed = [k for k in current if k in saved and int(saved[k]) != current[k]]
            if changed:
                then = ", ".join(f"{k}={saved[k]}" for k in changed)
                now = ", ".join(f"{k}={current[k]}" for k in changed)
                raise DataArgumentError(
                    f"the checkpoint's training tasks were drawn with {then}, this run has "
                    f"{now}: resuming would not continue the same stream of tasks. Resume with "
                    f"the checkpoint's values ({then}), or start a new run without the "
                    f"checkpoint",
                    {k: saved[k] for k in changed},
                )
        state = {"epoch": int(state_dict["epoch"]), "next_batch": int(state_dict["next_batch"])}
        if self._train_stream is not None:
            self._train_stream.load_state_dict(state)
        else:
            self._pending_state = state

    def _train_fetcher(self) -> Any:
        return getattr(getattr(self._trainer_or_none(), "fit_loop", None), "_data_fetcher", None)

    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)

    @staticmethod
    def _prefetched(fetcher: Any) -> int:
        # Lightning's fetcher pulls one batch ahead to detect the last one; such a batch has
        # left the stream but not reached training_step.
        batches = getattr(fetcher, "batches", None)
        return len(batches) if isinstance(batches, list) else 0

    def _trained_in_epoch(self) -> int | None:
        loop = getattr(getattr(self._trainer_or_none(), "fit_loop", None), "epoch_loop", None)
        progress = getattr(getattr(loop, "batch_progress", None), "current", None)
        completed = getattr(progress, "completed", None)
        return completed if isinstance(completed, int) else None


class SinusoidDataModule(TaskDataModule):
    """Sinusoid regression (MAML's distribution); needs no download.

    Args:
        shots: Support points per training task.
        queries: Query points per training task.
        eval_shots: Support points per evaluation task (default ``shots``).
        eval_queries: Query points per evaluation task (default ``queries``).
        eval_query_grid: Evaluate on 100 evenly spaced query points over ``x_range``.
        amplitude_range: Amplitude bounds.
        phase_range: Phase bounds.
        x_range: Input bounds.
        **kwargs: :class:`TaskDataModule` arguments (``meta_batch_size``, ``seed``, ...).

    Example:
        >>> dm = SinusoidDataModule(shots=5, meta_batch_size=4, train_batches_per_epoch=2)
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch.support_x.shape, batch.query_y.shape
        (torch.Size([4, 5, 1]), torch.Size([4, 10, 1]))
    """

    def __init__(
        self,
        *,
        shots: int = 10,
        queries: int = 10,
        eval_shots: int | None = None,
        eval_queries: int | None = None,
        eval_query_grid: bool = False,
        amplitude_range: Sequence[float] = (0.1, 5.0),
        phase_range: Sequence[float] = (0.0, math.pi),
        x_range: Sequence[float] = (-5.0, 5.0),
        meta_batch_size: int = 25,
        **kwargs: Any,
    ) -> None:
        super().__init__(meta_batch_size=meta_batch_size, **kwargs)
        self.shots, self.queries = shots, queries
        self.eval_shots = shots if eval_shots is None else eval_shots
        self.eval_queries = queries if eval_queries is None else eval_queries
        self.eval_query_grid = eval_query_grid
        self.ranges = {
            "amplitude_range": (float(amplitude_range[0]), float(amplitude_range[1])),
            "phase_range": (float(phase_range[0]), float(phase_range[1])),
            "x_range": (float(x_range[0]), float(x_range[1])),
        }
        self.build_samplers()  # validates the settings now rather than at setup

    def build_samplers(self) -> dict[str, TaskSampler]:
        """Returns one sinusoid sampler for training and one for val/test."""
        train = SinusoidTasks(self.shots, self.queries, **self.ranges)
        evaluation = SinusoidTasks(
            self.eval_shots, self.eval_queries, query_grid=self.eval_query_grid, **self.ranges
        )
        return {"train": train, "val": evaluation, "test": evaluation}


class EpisodicDataModule(TaskDataModule):
    """N-way K-shot classification over :class:`FewShotDataset` splits.

    Give the datasets directly, or subclass and override :meth:`load_datasets` (as the
    Omniglot, image-folder and mini-ImageNet modules do). The three splits should have
    disjoint classes.

    Args:
        train_dataset: Training classes.
        val_dataset: Validation classes (optional).
        test_dataset: Test classes (optional).
        ways: Classes per training task.
        shots: Support examples per class in training tasks.
        queries: Query examples per class in training tasks.
        eval_ways: Classes per evaluation task (default ``ways``).
        eval_shots: Support examples per class in evaluation tasks (default ``shots``).
        eval_queries: Query examples per class in evaluation tasks (default ``queries``).
        **kwargs: :class:`TaskDataModule` arguments (``meta_batch_size``,
            ``train_batches_per_epoch``, ``val_episodes``, ``test_episodes``,
            ``eval_meta_batch_size``, ``seed``, ``eval_seed``, ``num_workers``, ...).

    Example:
        >>> import torch
        >>> ds = FewShotDataset(torch.rand(100, 1, 8, 8), torch.arange(10).repeat(10))
        >>> dm = EpisodicDataModule(ds, ds.subset(range(5)), ways=5, shots=1, queries=2,
        ...                         meta_batch_size=4, val_episodes=8)
        >>> next(iter(dm.val_dataloader())).support_x.shape
        torch.Size([4, 5, 1, 8, 8])
    """

    def __init__(
        self,
        train_dataset: FewShotDataset | None = None,
        val_dataset: FewShotDataset | None = None,
        test_dataset: FewShotDataset | None = None,
        *,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        eval_ways: int | None = None,
        eval_shots: int | None = None,
        eval_queries: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.eval_ways = ways if eval_ways is None else eval_ways
        self.eval_shots = shots if eval_shots is None else eval_shots
        self.eval_queries = queries if eval_queries is None else eval_queries
        check_positive(
            ways=self.ways,
            shots=self.shots,
            queries=self.queries,
            eval_ways=self.eval_ways,
            eval_shots=self.eval_shots,
            eval_queries=self.eval_queries,
        )
        self._given = {"train": train_dataset, "val": val_dataset, "test": test_dataset}
        self.datasets: dict[str, FewShotDataset] | None = None

    def load_datasets(self) -> dict[str, FewShotDataset | None]:
        """Returns the dataset of each split (``None`` where absent)."""
        return dict(self._given)

    def build_samplers(self) -> dict[str, TaskSampler]:
        """Loads the datasets and builds an :class:`EpisodicSampler` per split present."""
        datasets = {k: v for k, v in self.load_datasets().items() if v is not None}
        self.datasets = datasets
        samplers: dict[str, TaskSampler] = {}
        for split, dataset in datasets.items():
            train = split == "train"
            try:
                samplers[split] = EpisodicSampler.from_dataset(
                    dataset,
                    ways=self.ways if train else self.eval_ways,
                    shots=self.shots if train else self.eval_shots,
                    queries=self.queries if train else self.eval_queries,
                )
            except ValueError as err:
                raise ValueError(f"{split} split: {err}") from err
        return samplers


class OmniglotDataModule(EpisodicDataModule):
    """Omniglot few-shot classification with character or alphabet splits.

    Args:
        root: Folder with the Omniglot zips or extracted folders.
        sets: Omniglot sets to merge (see :class:`~metalight.data.omniglot.Omniglot`).
        image_size: Image side (28 by default).
        split: ``"character"`` (seeded shuffle of characters) or ``"alphabet"``.
        num_train_characters: Characters for training with ``split="character"``;
            ``None`` for all the characters not held out for validation (then nothing is
            left for testing).
        num_val_characters: Characters for validation with ``split="character"`` (the rest
            are for testing); 0 for no validation.
        split_seed: Seed of the character shuffle (not the training seed, so the split is
            the same in every run).
        train_alphabets: Alphabet names for training with ``split="alphabet"``; ``None``
            for every alphabet not listed for validation or testing.
        val_alphabets: Alphabet names for validation with ``split="alphabet"``; ``[]`` for
            no validation.
        test_alphabets: Alphabet names for testing with ``split="alphabet"``; ``[]`` for no
            test.
        train_rotations: Add 90/180/270-degree rotations as new training classes.
        eval_rotations: Add them to the validation and test classes too.
        download: Download the official zips if missing (in ``prepare_data``).
        cache_dir: Optional decoded-tensor cache folder.
        **kwargs: :class:`EpisodicDataModule` arguments (``ways``, ``shots``, ``queries``,
            ``meta_batch_size``, ``seed``, ...).

    Training on every character, with no held-out split (validation and test are then
    absent; ``metalight train`` skips them and says so)::

        OmniglotDataModule(root, num_train_characters=None, num_val_characters=0)
        OmniglotDataModule(root, split="alphabet", val_alphabets=[], test_alphabets=[])

    Example:
        >>> dm = OmniglotDataModule("data/omniglot")  # nothing is read before setup()
        >>> dm.transform  # what a new character image must go through
        OmniglotTransform(image_size=28, channels=1, invert=True)
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        sets: Sequence[str] = OMNIGLOT_SETS,
        image_size: int | None = 28,
        split: str = "character",
        num_train_characters: int | None = 1200,
        num_val_characters: int = 100,
        split_seed: int = 0,
        train_alphabets: Sequence[str] | None = None,
        val_alphabets: Sequence[str] | None = None,
        test_alphabets: Sequence[str] | None = None,
        train_rotations: bool = True,
        eval_rotations: bool = False,
        download: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if split not in ("character", "alphabet"):
            raise ValueError(f"split must be 'character' or 'alphabet', got {split!r}.")
        alphabets = (train_alphabets, val_alphabets, test_alphabets)
        if split == "alphabet" and (val_alphabets is None or test_alphabets is None):
            raise ValueError(
                "split='alphabet' needs val_alphabets and test_alphabets (lists of alphabet "
                "names; [] for none) and takes train_alphabets (null: all the others)."
            )
        bad_train = num_train_characters is not None and num_train_characters < 1
        if split == "character" and (bad_train or num_val_characters < 0):
            raise ValueError(
                f"num_train_characters must be >= 1 or null (all the characters not held "
                f"out) and num_val_characters >= 0, got {num_train_characters} and "
                f"{num_val_characters}."
            )
        self.root = root
        self.sets = [sets] if isinstance(sets, str) else list(sets)
        self.image_size = image_size
        self.split = split
        self.num_train_characters = num_train_characters
        self.num_val_characters = num_val_characters
        self.split_seed = split_seed
        self.alphabet_lists = [None if a is None else list(a) for a in alphabets]
        self.train_rotations = train_rotations
        self.eval_rotations = eval_rotations
        self.download = download
        self.cache_dir = cache_dir

    def prepare_data(self) -> None:
        """Downloads the missing official zips when ``download=True`` (rank 0 only)."""
        if self.download:
            official = [s for s in self.sets if s in OMNIGLOT_SETS]
            download_omniglot(self.root, official)

    def load_datasets(self) -> dict[str, FewShotDataset | None]:
        """Decodes Omniglot once and returns class-disjoint splits."""
        full = Omniglot(
            self.root, self.sets, self.image_size, download=self.download, cache_dir=self.cache_dir
        )
        if self.split == "character":
            splits = full.split_by_character(
                self.num_train_characters, self.num_val_characters, self.split_seed
            )
        else:
            train_names, val_names, test_names = self.alphabet_lists
            held_out = set(val_names or []) | set(test_names or [])
            if train_names is None:
                train_names = [a for a in full.alphabets if a not in held_out]
            splits = full.split_by_alphabet(train_names, val_names or [], test_names or [])
        train, val, test = splits
        if self.train_rotations:
            train = train.with_rotations()
        # An empty evaluation list (e.g. val_alphabets=[]) means no such split, not an error.
        evaluation = {
            name: None if part.num_classes == 0 else part
            for name, part in (("val", val), ("test", test))
        }
        if self.eval_rotations:
            evaluation = {
                k: v.with_rotations() if v is not None else None for k, v in evaluation.items()
            }
        return {"train": train, **evaluation}

    @property
    def transform(self) -> ImageTransform:
        """What every Omniglot image went through; apply it to new character images."""
        return OmniglotTransform(self.image_size)


class ImageFolderDataModule(EpisodicDataModule):
    """Few-shot classification over folders of class folders, one folder per split.

    Args:
        train_root: ``<train_root>/<class>/<images>``.
        val_root: Validation classes, same layout (optional).
        test_root: Test classes, same layout (optional).
        image_size: Resize side or ``(height, width)``; ``None`` keeps the stored size.
        channels: 1 or 3.
        invert: Store ``1 - value``.
        cache_dir: Optional decoded-tensor cache folder.
        **kwargs: :class:`EpisodicDataModule` arguments.

    Example:
        >>> dm = ImageFolderDataModule("data/train", "data/val", image_size=32)  # doctest: +SKIP
    """

    def __init__(
        self,
        train_root: str | os.PathLike[str],
        val_root: str | os.PathLike[str] | None = None,
        test_root: str | os.PathLike[str] | None = None,
        *,
        image_size: int | Sequence[int] | None = 84,
        channels: int = 3,
        invert: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.roots = {"train": train_root, "val": val_root, "test": test_root}
        self.image_size = image_size
        self.channels = channels
        self.invert = invert
        self.cache_dir = cache_dir

    @property
    def transform(self) -> ImageTransform:
        """What every image of the folders went through; apply it to new images."""
        return ImageTransform(self.image_size, self.channels, self.invert)

    def load_datasets(self) -> dict[str, FewShotDataset | None]:
        """Decodes each split's folder."""
        return {
            split: None
            if root is None
            else ImageFolder(
                root, self.image_size, self.channels, self.invert, cache_dir=self.cache_dir
            )
            for split, root in self.roots.items()
        }


class MiniImageNetDataModule(EpisodicDataModule):
    """mini-ImageNet (Ravi & Larochelle splits), 84x84 RGB.

    Args:
        root: Folder holding ``train.csv``, ``val.csv``, ``test.csv`` and ``images/``.
        image_size: Image side (84 by default).
        cache_dir: Optional decoded-tensor cache folder (recommended).
        **kwargs: :class:`EpisodicDataModule` arguments.

    Example:
        >>> dm = MiniImageNetDataModule("data/miniimagenet", ways=5, shots=5)  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        image_size: int | Sequence[int] = 84,
        cache_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.image_size = image_size
        self.cache_dir = cache_dir

    @property
    def transform(self) -> ImageTransform:
        """What every mini-ImageNet image went through; apply it to new images."""
        return ImageTransform(self.image_size, channels=3)

    def load_datasets(self) -> dict[str, FewShotDataset | None]:
        """Decodes the three splits."""
        return {
            split: MiniImageNet(self.root, split, self.image_size, cache_dir=self.cache_dir)
            for split in _SPLITS
        }
