"""Fixed episodes stored as folders: a benchmark or an application's tasks, read as data.

Layout, one folder per episode (any ways, shots and queries per episode)::

    DIR/<episode>/support/<class>/<image>
    DIR/<episode>/query/<class>/<image>

Episodes are read in the order of their folder names, classes in the order of theirs (the
label of a class is its position among the episode's support classes), images in the order
of their file names. A query class folder must have a support folder of the same name.

Example:
    >>> from metalight.data import OmniglotTransform
    >>> episodes = FixedEpisodes("benchmarks/greek_5w1s", OmniglotTransform())  # doctest: +SKIP
    >>> task = episodes[0]  # doctest: +SKIP
    >>> task.support_x.shape, episodes.class_names[0]  # doctest: +SKIP
    (torch.Size([5, 1, 28, 28]), ['alpha', 'beta', 'gamma', 'delta', 'pi'])
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from metalight.data._images import IMAGE_EXTENSIONS
from metalight.data.task import Task, TaskBatch
from metalight.data.transforms import ImageTransform

__all__ = [
    "ClassFolder",
    "EpisodesDataModule",
    "FixedEpisodes",
    "list_images",
    "read_class_folders",
]


class ClassFolder:
    """Images of a folder of class folders (``root/<class>/<image>``), decoded once.

    Attributes:
        root: The folder.
        class_names: The class folder names, sorted; class ``c`` has label ``c``.
        files: The image files, grouped by class, each class sorted by file name.
        x: The images, float32 ``[N, channels, H, W]`` in ``files`` order.
        y: The int64 labels of ``x``.
    """

    def __init__(
        self, root: Path, class_names: list[str], files: list[Path], x: Tensor, y: Tensor
    ) -> None:
        self.root = root
        self.class_names = class_names
        self.files = files
        self.x = x
        self.y = y


def list_images(folder: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """The image files directly in ``folder``, sorted by name (hidden files skipped).

    Raises:
        ValueError: If ``folder`` holds a sub-folder or a file that is not an image, or no
            image at all; the message names the path.
    """
    endings = tuple(e.lower() for e in extensions)
    images = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue  # .DS_Store and the like
        if path.is_dir():
            raise ValueError(
                f"{path} is a folder inside the class folder {folder}; a class folder holds "
                "image files only: move its images up or remove it."
            )
        if not path.name.lower().endswith(endings):
            raise ValueError(
                f"{path} is not an image file (image files end in {', '.join(endings)}); "
                "remove it from the class folder."
            )
        images.append(path)
    if not images:
        raise ValueError(
            f"class folder {folder} is empty: it holds no image files; add images or remove "
            "the folder."
        )
    return images


def read_class_folders(
    root: str | os.PathLike[str],
    transform: ImageTransform,
    classes: Sequence[str] | None = None,
    what: str = "folder",
) -> ClassFolder:
    """Reads ``root/<class>/<image>`` with ``transform``: the images, their labels, names.

    Args:
        root: Folder of class folders.
        transform: What each image goes through (the training data's transform).
        classes: The class names in label order; every class folder must be one of them
            (folders may be missing). Default: the sorted class folder names.
        what: What ``root`` is, for messages (``"support folder"``, ...).

    Returns:
        The :class:`ClassFolder`.

    Raises:
        FileNotFoundError: If ``root`` does not exist.
        ValueError: If ``root`` holds no class folder, a file beside the class folders, an
            empty class, a class not in ``classes``, a non-image or undecodable file, or
            images of different sizes; each message names the path.

    Example:
        >>> support = read_class_folders("new_characters", OmniglotTransform())  # doctest: +SKIP
        >>> support.x.shape, support.class_names  # doctest: +SKIP
        (torch.Size([3, 1, 28, 28]), ['a', 'b', 'c'])
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"{what} {root} does not exist; expected a folder laid out as "
            f"{root}/<class name>/<image files>."
        )
    folders = []
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        if not path.is_dir():
            raise ValueError(
                f"{path} is a file beside the class folders of {root}; put each image in the "
                "folder of its class, e.g. "
                f"{root}/<class name>/{path.name}."
            )
        folders.append(path)
    if not folders:
        raise ValueError(
            f"{what} {root} holds no class folders; put the images of each class in their "
            f"own folder {root}/<class name>/."
        )
    names = [p.name for p in folders] if classes is None else list(classes)
    label_of = {name: i for i, name in enumerate(names)}
    files: list[Path] = []
    labels: list[int] = []
    for folder in folders:
        if folder.name not in label_of:
            raise ValueError(
                f"class folder {folder} has no match among the classes {names} "
                "(a query class must have a support folder of the same name); rename or "
                "remove it."
            )
        images = list_images(folder)
        files.extend(images)
        labels.extend([label_of[folder.name]] * len(images))
    x = transform.stack(files)
    return ClassFolder(root, names, files, x, torch.tensor(labels, dtype=torch.long))


class FixedEpisodes(Sequence[Task]):
    """Episodes stored as folders (see the module docstring), decoded once, as tasks.

    Each episode is a :class:`~metalight.data.task.Task`: support and query ordered by class
    (labels ``0..N-1`` by sorted support class name, ``info`` = ``arange(N)``), images
    through ``transform``. Episodes may differ in ways, shots and queries.

    Args:
        root: The folder of episode folders.
        transform: What each image goes through: the transform of the training data (e.g.
            ``datamodule.transform`` or ``metalight.load(run).transform``).

    Attributes:
        root: The folder.
        names: The episode folder names, in order.
        class_names: Per episode, its class names in label order.
        support_files: Per episode, the support image files in task order.
        query_files: Per episode, the query image files in task order.

    Raises:
        FileNotFoundError: If ``root`` does not exist.
        ValueError: On a folder that breaks the layout (no episode at all, a missing
            ``support/`` or ``query/``, a query class missing from the support, an empty
            class, a non-image file, images of different sizes); the one-line message
            names the path.

    Example:
        >>> episodes = FixedEpisodes("episodes", OmniglotTransform(28))  # doctest: +SKIP
        >>> [len(t.support_y) for t in episodes]  # doctest: +SKIP
        [5, 10, 5]
    """

    def __init__(
        self, root: str | os.PathLike[str], transform: ImageTransform | None = None
    ) -> None:
        root = Path(root).expanduser()
        transform = transform if transform is not None else ImageTransform()
        if not root.is_dir():
            raise FileNotFoundError(
                f"episodes folder {root} does not exist; expected "
                f"{root}/<episode>/support/<class>/<image> and "
                f"{root}/<episode>/query/<class>/<image>."
            )
        folders = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        if not folders:
            raise ValueError(
                f"episodes folder {root} holds no episodes: expected one folder per episode, "
                f"{root}/<episode>/support/<class>/<image> and "
                f"{root}/<episode>/query/<class>/<image>."
            )
        self.root = root
        self.transform = transform
        self.names: list[str] = []
        self.class_names: list[list[str]] = []
        self.support_files: list[list[Path]] = []
        self.query_files: list[list[Path]] = []
        self._tasks: list[Task] = []
        for folder in folders:
            for part in ("support", "query"):
                if not (folder / part).is_dir():
                    raise ValueError(
                        f"episode {folder} has no {part}/ folder; each episode holds "
                        f"{folder}/support/<class>/<image> and {folder}/query/<class>/<image>."
                    )
            support = read_class_folders(folder / "support", transform, what="support folder")
            query = read_class_folders(
                folder / "query", transform, classes=support.class_names, what="query folder"
            )
            if support.x.shape[1:] != query.x.shape[1:]:
                raise ValueError(
                    f"episode {folder}: support image {support.files[0]} has shape "
                    f"{tuple(support.x.shape[1:])} but query image {query.files[0]} has "
                    f"{tuple(query.x.shape[1:])}; resize every image to one size (pass an "
                    "image_size)."
                )
            self.names.append(folder.name)
            self.class_names.append(support.class_names)
            self.support_files.append(support.files)
            self.query_files.append(query.files)
            ways = len(support.class_names)
            self._tasks.append(Task(support.x, support.y, query.x, query.y, torch.arange(ways)))

    def __len__(self) -> int:
        return len(self._tasks)

    @overload
    def __getitem__(self, index: int) -> Task: ...

    @overload
    def __getitem__(self, index: slice) -> list[Task]: ...

    def __getitem__(self, index: int | slice) -> Task | list[Task]:
        """Episode ``index`` as a :class:`~metalight.data.task.Task` (a list for a slice)."""
        return self._tasks[index]

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks)

    def __repr__(self) -> str:
        return f"FixedEpisodes(root={str(self.root)!r}, episodes={len(self)})"


class EpisodesDataModule(pl.LightningDataModule):
    """Fixed episodes from folders as a test split (``data=episodes data.root=DIR``).

    The test loader yields each episode, in folder order, as a
    :class:`~metalight.data.task.TaskBatch` of one task (episodes may differ in shape).
    There is no training or validation split.

    Args:
        root: The folder of episode folders (see :class:`FixedEpisodes`).
        image_size: Resize side or ``(height, width)``; ``None`` keeps the stored size.
            Use the training data's settings (``metalight eval`` fills in those of the
            checkpoint's run for any left ``None``).
        channels: 1 or 3 (``None``: 3).
        invert: Return ``1 - value`` (``None``: false); Omniglot's images are inverted.
        transform: A ready transform, instead of the three settings above.

    Example:
        >>> dm = EpisodesDataModule("episodes", transform=OmniglotTransform())  # doctest: +SKIP
        >>> batch = next(iter(dm.test_dataloader()))  # doctest: +SKIP
        >>> len(batch)  # doctest: +SKIP
        1
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        image_size: int | Sequence[int] | None = None,
        channels: int | None = None,
        invert: bool | None = None,
        transform: ImageTransform | None = None,
    ) -> None:
        super().__init__()
        self.root = root
        if transform is None:
            channels = 3 if channels is None else channels
            transform = ImageTransform(image_size, channels, bool(invert))
        self._transform = transform
        self.episodes: FixedEpisodes | None = None

    @property
    def transform(self) -> ImageTransform:
        """What each image goes through."""
        return self._transform

    def setup(self, stage: str | None = None) -> None:
        """Reads and checks every episode once; later calls reuse them."""
        if self.episodes is None:
            self.episodes = FixedEpisodes(self.root, self._transform)

    def split_names(self) -> tuple[str, ...]:
        """Only ``("test",)``."""
        return ("test",)

    def test_dataloader(self) -> DataLoader[Any]:
        """Each episode as a :class:`TaskBatch` of one, in folder order."""
        self.setup()
        assert self.episodes is not None
        batches = [TaskBatch.stack([task]) for task in self.episodes]
        return DataLoader(batches, batch_size=None, shuffle=False)  # type: ignore[arg-type]

    def train_dataloader(self) -> DataLoader[Any]:
        """Refused: fixed episodes are for testing only."""
        raise ValueError(
            f"{type(self).__name__} holds fixed test episodes only and cannot train; train "
            "with another data module, then test the trained module on these episodes."
        )
