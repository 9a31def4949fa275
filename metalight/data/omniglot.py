"""Omniglot handwritten characters from the official zip files or their extracted folders."""

from __future__ import annotations

import contextlib
import hashlib
import os
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from metalight.data._images import cached_tensors, decode_images
from metalight.data._validation import DataArgumentError
from metalight.data.dataset import DatasetSplits, FewShotDataset
from metalight.data.download import download_file
from metalight.data.transforms import OmniglotTransform

__all__ = [
    "OMNIGLOT_MD5",
    "OMNIGLOT_SETS",
    "OMNIGLOT_URL",
    "Omniglot",
    "download_omniglot",
]

OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{name}.zip"
OMNIGLOT_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
# The two full sets; the small ones (images_background_small1/2) are not downloadable here.
OMNIGLOT_SETS = ("images_background", "images_evaluation")

_Entry = tuple[str, int, Callable[[], bytes]]  # (file name for errors, size, read)


def download_omniglot(
    root: str | os.PathLike[str], sets: Sequence[str] = OMNIGLOT_SETS
) -> list[Path]:
    """Downloads the official Omniglot zips into ``root`` unless already there.

    Files are checked against their published MD5 and written atomically.

    Args:
        root: Folder to hold ``images_background.zip`` and ``images_evaluation.zip``.
        sets: Which of :data:`OMNIGLOT_SETS` to fetch.

    Returns:
        The zip paths.

    Example:
        >>> download_omniglot("data/omniglot")  # doctest: +SKIP
    """
    paths = []
    for name in sets:
        if name not in OMNIGLOT_MD5:
            raise ValueError(
                f"Omniglot set {name!r} cannot be downloaded; only {list(OMNIGLOT_MD5)} have "
                f"official URLs. Put {name}.zip in {root} by hand."
            )
        path = Path(root) / f"{name}.zip"
        if not path.is_file():
            download_file(OMNIGLOT_URL.format(name=name), path, md5=OMNIGLOT_MD5[name])
        paths.append(path)
    return paths


class Omniglot(FewShotDataset):
    """Omniglot characters (1 class per ``alphabet/character``, 20 drawers each).

    Reads ``<set>.zip`` (read in place with :mod:`zipfile`) or an extracted ``<set>/`` folder
    from ``root`` for every requested set, with the official layout
    ``<set>/<alphabet>/<character>/<drawer>.png``. Several sets are merged; a class present in
    more than one (the small sets share Greek and Latin) is kept once, keyed by
    ``alphabet/character``. Classes are sorted by that key; images are float in ``[0, 1]``
    with strokes as 1, shape ``[1, image_size, image_size]``, held as one uint8 tensor.

    Args:
        root: Folder holding the zips or extracted folders.
        sets: Set names, e.g. ``("images_background", "images_evaluation")`` or
            ``("images_background_small1", "images_background_small2")``.
        image_size: Side of the resized images (105 is the original), ``None`` to keep 105.
        download: Fetch the missing full sets (:data:`OMNIGLOT_SETS`) from the official
            repository first. Nothing is downloaded otherwise.
        cache_dir: Optional folder for a decoded-tensor cache reused across runs.

    Attributes:
        transform: The :class:`~metalight.data.transforms.OmniglotTransform` every image went
            through; apply it to a new character image to get what the model saw.

    Raises:
        FileNotFoundError: If ``root`` or a set is missing (the message lists the files
            looked for and how to get them).
        ValueError: If a set holds no PNG files, a zip is truncated or corrupt, or an
            image cannot be decoded (each message names the file and what to do).

    Example:
        >>> ds = Omniglot("data/omniglot", download=True)  # doctest: +SKIP
        >>> splits = ds.split_by_character(num_train=1200, num_val=100)  # doctest: +SKIP
        >>> train = splits.train.with_rotations()  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        sets: Sequence[str] | str = OMNIGLOT_SETS,
        image_size: int | None = 28,
        download: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        root = Path(root).expanduser()
        set_names = [sets] if isinstance(sets, str) else list(sets)
        if not set_names:
            raise ValueError("sets is empty; pass at least one Omniglot set name.")
        transform = OmniglotTransform(image_size)
        size = transform.size
        if download:
            download_omniglot(root, [s for s in set_names if not _find_set(root, s)])
        _check_present(root, set_names)

        with contextlib.ExitStack() as stack:
            classes = _scan(root, set_names, stack)
            manifest = hashlib.sha256(
                "\n".join(
                    f"{key}/{name}:{nbytes}"
                    for key, entries in classes.items()
                    for name, nbytes, _ in entries
                ).encode()
            ).hexdigest()
            key = {"sets": set_names, "size": size, "manifest": manifest}

            def build() -> dict[str, object]:
                keys = sorted(classes)
                sources = [(name, read) for k in keys for name, _, read in classes[k]]
                targets = [c for c, k in enumerate(keys) for _ in classes[k]]
                data = decode_images(
                    sources, size, channels=transform.channels, invert=transform.invert
                )
                return {"data": data, "targets": torch.tensor(targets), "class_names": keys}

            loaded = cached_tensors(cache_dir, "omniglot", key, build)
        super().__init__(loaded["data"], loaded["targets"], loaded["class_names"])
        self.root = root
        self.sets = set_names
        self.transform = transform

    @property
    def class_alphabets(self) -> list[str]:
        """Alphabet of each class."""
        return [name.split("/")[0] for name in self.class_names]

    @property
    def alphabets(self) -> list[str]:
        """Sorted names of the alphabets present."""
        return sorted(set(self.class_alphabets))

    def split_by_alphabet(
        self, train: Sequence[str], val: Sequence[str], test: Sequence[str]
    ) -> DatasetSplits:
        """Splits classes by alphabet: every character of an alphabet goes to one split.

        Args:
            train: Alphabet names for training.
            val: Alphabet names for validation.
            test: Alphabet names for testing.

        Raises:
            ValueError: On an unknown alphabet or one listed in two splits.

        Example:
            >>> ds.split_by_alphabet(["Greek", "Korean"], ["Latin"], ["Balinese"])  # doctest: +SKIP
        """
        groups = {"train": list(train), "val": list(val), "test": list(test)}
        known = set(self.alphabets)
        seen: dict[str, str] = {}
        for split, names in groups.items():
            for name in names:
                if name not in known:
                    raise ValueError(
                        f"unknown alphabet {name!r} in the {split} split; available: "
                        f"{', '.join(self.alphabets)}."
                    )
                if name in seen:
                    raise ValueError(
                        f"alphabet {name!r} is listed in both the {seen[name]} and {split} "
                        "splits; each alphabet must go to one split."
                    )
                seen[name] = split
        alphabet_of = self.class_alphabets
        parts = [
            self.subset([c for c in range(self.num_classes) if alphabet_of[c] in set(names)])
            for names in groups.values()
        ]
        return DatasetSplits(*parts)

    def split_by_character(
        self, num_train: int | None = 1200, num_val: int = 100, seed: int = 0
    ) -> DatasetSplits:
        """Splits classes by character: a seeded shuffle, then train, val and test in turn.

        With the full dataset (1623 characters) the defaults give the common protocol of 1200
        training characters, the remaining 423 being split into 100 for validation and 323
        for testing (``num_train=1100`` gives MAML's 1100/100/423 instead). ``num_val=0``
        leaves no validation characters and ``num_train=None`` trains on every character not
        held out for validation (no test characters): ``split_by_character(None, 0)`` trains
        on all of them.

        Args:
            num_train: Characters for training (the first of the shuffle); ``None`` for all
                those not taken for validation.
            num_val: Characters for validation (the next ones), 0 for none; the rest are for
                testing.
            seed: Seed of the shuffle, independent of any training seed.

        Returns:
            The three splits; a split without characters is an empty dataset
            (``num_classes == 0``).

        Raises:
            ValueError: If training would get no character, or the counts exceed the total.

        Example:
            >>> train, val, test = ds.split_by_character(None, 0)  # doctest: +SKIP
            >>> train.num_classes == ds.num_classes, test.num_classes  # doctest: +SKIP
            (True, 0)
        """
        total = self.num_classes
        if num_train is None:
            num_train = total - num_val
        if num_train <= 0 or num_val < 0 or num_train + num_val > total:
            raise ValueError(
                f"cannot split {total} characters into {num_train} train, {num_val} val and "
                f"{total - num_train - num_val} test; choose num_train >= 1 and num_val >= 0 "
                f"with num_train + num_val <= {total} (num_train=None trains on all the "
                "characters not held out for validation)."
            )
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
        chunks = (
            order[:num_train],
            order[num_train : num_train + num_val],
            order[num_train + num_val :],
        )
        return DatasetSplits(*(self.subset(sorted(chunk)) for chunk in chunks))


def _find_set(root: Path, name: str) -> Path | None:
    for candidate in (root / f"{name}.zip", root / name):
        if candidate.exists():
            return candidate
    return None


def _check_present(root: Path, set_names: Sequence[str]) -> None:
    missing = [s for s in set_names if _find_set(root, s) is None]
    if root.is_dir() and not missing:
        return
    looked_for = "; ".join(f"{root / (s + '.zip')} or the folder {root / s}" for s in missing)
    downloadable = [s for s in missing if s in OMNIGLOT_MD5]
    fixes = []
    if downloadable:
        fixes.append(
            f"pass download=True to fetch {', '.join(s + '.zip' for s in downloadable)} from "
            "https://github.com/brendenlake/omniglot"
        )
    others = [s for s in missing if s not in OMNIGLOT_MD5]
    if others:
        fixes.append(
            f"copy {', '.join(s + '.zip' for s in others)} (from the python/ folder of "
            f"https://github.com/brendenlake/omniglot) into {root}"
        )
    where = "does not exist" if not root.is_dir() else "lacks some Omniglot sets"
    raise FileNotFoundError(
        f"Omniglot root folder {root} {where}. Looked for: {looked_for}. "
        f"To fix: {'; or '.join(fixes)}."
    )


def _scan(
    root: Path, set_names: Sequence[str], stack: contextlib.ExitStack
) -> dict[str, list[_Entry]]:
    """Lists the PNGs of each class, keeping the first set's copy of a repeated class."""
    classes: dict[str, list[_Entry]] = {}
    for set_name in set_names:
        source = _find_set(root, set_name)
        assert source is not None
        found: dict[str, list[_Entry]] = {}
        if source.is_file():
            archive = stack.enter_context(_open_zip(source))
            for info in archive.infolist():
                parts = info.filename.split("/")
                if _is_image_path(parts):
                    found.setdefault(f"{parts[-3]}/{parts[-2]}", []).append(
                        (f"{source}:{info.filename}", info.file_size, _zip_reader(archive, info))
                    )
        else:
            for path in source.rglob("*"):
                parts = path.relative_to(source).parts
                if path.is_file() and _is_image_path(list(parts), min_depth=3):
                    found.setdefault(f"{parts[-3]}/{parts[-2]}", []).append(
                        (str(path), path.stat().st_size, path.read_bytes)
                    )
        if not found:
            raise ValueError(
                f"{source} holds no Omniglot images (expected "
                f"<alphabet>/<character>/<drawer>.png inside); re-download or re-extract it."
            )
        for key, entries in found.items():
            # Classes repeated across sets are identical copies (small1/small2 share Greek and
            # Latin), so the first set's files stand for the class.
            classes.setdefault(key, sorted(entries, key=lambda e: e[0]))
    return classes


def _is_image_path(parts: list[str], min_depth: int = 3) -> bool:
    return (
        len(parts) >= min_depth
        and parts[-1].lower().endswith(".png")
        and not any(p.startswith((".", "__MACOSX")) for p in parts)
    )


def _damaged(path: Path, err: BaseException) -> ValueError:
    size = path.stat().st_size if path.is_file() else 0
    what = "is empty (0 bytes)" if size == 0 else f"is damaged ({size} bytes: {err})"
    name = path.name.removesuffix(".zip")
    fix = (
        " (once it is deleted, download=True fetches it)"
        if name in OMNIGLOT_MD5
        else " from the python/ folder of https://github.com/brendenlake/omniglot"
    )
    return DataArgumentError(
        f"Omniglot zip file {path} {what}: a truncated or corrupt download. Delete it and "
        f"download it again{fix}.",
        {"download": True} if name in OMNIGLOT_MD5 else {},
    )


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise _damaged(path, err) from err


def _zip_reader(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            return archive.read(info)
        except (zipfile.BadZipFile, EOFError, zlib.error) as err:
            # A zip cut short can still list its members; reading one then fails.
            raise _damaged(Path(str(archive.filename)), err) from err

    return read
