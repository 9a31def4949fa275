"""Few-shot data: tasks, episodic samplers, datasets, reproducible streams and DataModules.

Example:
    >>> import torch
    >>> from metalight.data import SinusoidTasks, TrainTaskStream
    >>> stream = TrainTaskStream(SinusoidTasks(shots=5), meta_batch_size=4, num_batches=2)
    >>> batch = next(iter(stream))
    >>> batch.support_x.shape
    torch.Size([4, 5, 1])
"""

from metalight.data._images import IMAGE_EXTENSIONS
from metalight.data.datamodule import (
    EpisodicDataModule,
    ImageFolderDataModule,
    MiniImageNetDataModule,
    OmniglotDataModule,
    SinusoidDataModule,
    TaskDataModule,
)
from metalight.data.dataset import DatasetSplits, FewShotDataset
from metalight.data.digits import DigitsDataModule, NoisyDigitsDataModule
from metalight.data.download import download_file, md5sum
from metalight.data.episodes import (
    ClassFolder,
    EpisodesDataModule,
    FixedEpisodes,
    list_images,
    read_class_folders,
)
from metalight.data.image_folder import ImageFolder
from metalight.data.mini_imagenet import MINI_IMAGENET_SPLITS, MiniImageNet
from metalight.data.omniglot import (
    OMNIGLOT_MD5,
    OMNIGLOT_SETS,
    OMNIGLOT_URL,
    Omniglot,
    download_omniglot,
)
from metalight.data.sampler import ClassIndexedDataset, EpisodicSampler, TaskSampler
from metalight.data.sinusoid import SinusoidTasks
from metalight.data.streams import (
    DEFAULT_EVAL_SEED,
    EvalTaskStream,
    TaskDataLoader,
    TrainTaskStream,
    derive_seed,
    draw_task,
    seed_worker,
)
from metalight.data.task import Task, TaskBatch
from metalight.data.transforms import ImageTransform, OmniglotTransform, to_float

__all__ = [
    "DEFAULT_EVAL_SEED",
    "IMAGE_EXTENSIONS",
    "MINI_IMAGENET_SPLITS",
    "OMNIGLOT_MD5",
    "OMNIGLOT_SETS",
    "OMNIGLOT_URL",
    "ClassFolder",
    "ClassIndexedDataset",
    "DatasetSplits",
    "DigitsDataModule",
    "EpisodesDataModule",
    "EpisodicDataModule",
    "EpisodicSampler",
    "EvalTaskStream",
    "FewShotDataset",
    "FixedEpisodes",
    "ImageFolder",
    "ImageFolderDataModule",
    "ImageTransform",
    "MiniImageNet",
    "MiniImageNetDataModule",
    "NoisyDigitsDataModule",
    "Omniglot",
    "OmniglotDataModule",
    "OmniglotTransform",
    "SinusoidDataModule",
    "SinusoidTasks",
    "Task",
    "TaskBatch",
    "TaskDataLoader",
    "TaskDataModule",
    "TaskSampler",
    "TrainTaskStream",
    "derive_seed",
    "download_file",
    "download_omniglot",
    "draw_task",
    "list_images",
    "md5sum",
    "read_class_folders",
    "seed_worker",
    "to_float",
]
