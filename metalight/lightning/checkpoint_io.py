"""Crash-safe files: atomic checkpoint saves and small run files.

A process killed at any moment (``SIGKILL``, power loss after the data reached the disk, an
out-of-memory kill) must not destroy work already saved:

* :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the target
  folder, flushes and fsyncs it, then renames it over the target with :func:`os.replace`
  and fsyncs the folder. A reader sees either the previous complete file or the new
  complete file, never a prefix.
* :func:`atomic_write` does the same for small files of a run (configs, results).

Fresh run directories that never collide are :func:`metalight.run.resources.make_run_dir`'s.

Temporary files are hidden (``.<name>.<random>.tmp``) and never end in ``.ckpt``, so
Lightning's ``ckpt_path="last"`` lookup cannot pick up a half-written one. A process killed
while writing leaves such a file behind; it is harmless and can be deleted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = [
    "AtomicCheckpointIO",
    "CorruptCheckpointError",
    "DiskFullError",
    "as_disk_full",
    "atomic_write",
    "load_checkpoint_file",
    "verify_checkpoint",
]

_TMP_SUFFIX = ".tmp"


class CorruptCheckpointError(ValueError):
    """A checkpoint file exists but is not a complete, undamaged ``torch.save`` archive."""


class DiskFullError(OSError):
    """A write failed because the file system is full (or the disk quota is spent).

    The message names the file and the space left, and says that the file's previous
    version (if any) is intact: every write here goes through a temporary file.
    """


_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _disk_full_cause(err: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT error behind ``err`` (torch wraps it in a RuntimeError), if any."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL:
            return current
        current = current.__cause__ or current.__context__
    return None


def _free_space(directory: Path) -> str:
    for folder in (directory, *directory.parents):
        try:
            free = float(shutil.disk_usage(folder).free)
        except OSError:
            continue
        for unit in ("bytes", "KiB", "MiB", "GiB"):
            if free < 1024 or unit == "GiB":
                return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
            free /= 1024
    return "unknown space"


def as_disk_full(err: BaseException, where: Path) -> DiskFullError | None:
    """``err`` as a :class:`DiskFullError` if a full disk caused it (else ``None``), naming
    the file when the error knows it, else the folder ``where`` the run writes.

    Example:
        >>> import errno, pathlib
        >>> full = OSError(errno.ENOSPC, "No space left on device", "/tmp/x/metrics.csv")
        >>> str(as_disk_full(full, pathlib.Path("/tmp"))).split(" (")[0]
        'no space left on the device writing /tmp/x/metrics.csv'
        >>> as_disk_full(ValueError("no"), pathlib.Path("/tmp")) is None
        True
    """
    if isinstance(err, DiskFullError):
        return err
    cause = _disk_full_cause(err)
    if cause is None:
        return None
    return disk_full_error(Path(cause.filename) if cause.filename else where, err)


def disk_full_error(path: Path, err: BaseException) -> DiskFullError:
    """The :class:`DiskFullError` for a failed write of ``path``."""
    error = DiskFullError(
        f"no space left on the device writing {path} ({_free_space(path.parent)} free "
        f"there); its previous version, if any, is intact. Free some space (or give "
        f"paths.output_dir on a bigger disk) and run again"
    )
    error.errno = errno.ENOSPC
    return error


def _fsync_dir(directory: Path) -> None:
    """Makes a rename inside ``directory`` durable (a no-op where folders cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")


def _atomic_write_with(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Writes ``path`` through ``write(file)`` so that it appears complete or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(path)
    # O_EXCL: never follow or reuse an existing file; 0o666 lets the umask decide the mode,
    # as for a plain open().
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as err:
        if err.errno in _FULL:
            raise disk_full_error(path, err) from None
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        # torch.save reports a full disk as "unexpected pos 64 vs 0": say what happened.
        if isinstance(err, Exception) and _disk_full_cause(err) is not None:
            raise disk_full_error(path, err) from None
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes | str, encoding: str = "utf-8") -> None:
    """Writes ``data`` to ``path`` atomically: readers see the old file or the whole new one.

    Args:
        path: The file to (over)write; missing parent folders are created.
        data: The contents; ``str`` is encoded with ``encoding``.
        encoding: Encoding of ``str`` data.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> atomic_write(folder / "config.yaml", "seed: 0\\n")
        >>> (folder / "config.yaml").read_text()
        'seed: 0\\n'
    """
    blob = data.encode(encoding) if isinstance(data, str) else bytes(data)

    def write(f: IO[bytes]) -> None:
        f.write(blob)

    _atomic_write_with(Path(path), write)


def _is_local(path: _PATH) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


def _local_path(path: _PATH) -> Path:
    text = str(path)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` whose saves survive a kill at any moment.

    ``save_checkpoint`` streams ``torch.save`` into a hidden temporary file next to the
    target, flushes and fsyncs it, renames it over the target with :func:`os.replace` (atomic
    on POSIX and Windows within one file system) and fsyncs the folder, so the target path
    always holds a complete checkpoint: the previous one until the rename, the new one after.
    Loading explains a damaged file (:class:`CorruptCheckpointError`) instead of failing
    deep inside the unpickler. Remote paths (``s3://``, ...) are delegated to Lightning's
    :class:`~lightning.pytorch.plugins.io.TorchCheckpointIO`.

    Pass it to the trainer: ``lightning.Trainer(plugins=[AtomicCheckpointIO()])``.

    Example:
        >>> import tempfile, pathlib, torch
        >>> io = AtomicCheckpointIO()
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "last.ckpt"
        >>> io.save_checkpoint({"step": 1, "w": torch.ones(2)}, path)
        >>> io.load_checkpoint(path)["step"]
        1
        >>> sorted(p.name for p in path.parent.iterdir())  # no temporary file is left
        ['last.ckpt']
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        """Saves ``checkpoint`` to ``path`` atomically (see the class docstring).

        Raises:
            TypeError: If ``storage_options`` is given (there are none for local files).
        """
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint takes no storage_options, got "
                f"{storage_options!r}"
            )
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path)
            return
        _atomic_write_with(_local_path(path), lambda f: torch.save(checkpoint, f))

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Loads a checkpoint after checking that it is whole (see :func:`verify_checkpoint`).

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            IsADirectoryError: If ``path`` is a folder.
            CorruptCheckpointError: If the file is not a complete, undamaged ``torch.save``
                archive (cut short, bit rot, another kind of file).
        """
        if not _is_local(path):
            return super().load_checkpoint(
                path, map_location=map_location, weights_only=weights_only
            )
        local = _local_path(path)
        verify_checkpoint(local)
        try:
            return super().load_checkpoint(
                path, map_location=map_location, weights_only=weights_only
            )
        except (FileNotFoundError, IsADirectoryError):
            raise
        except Exception as err:
            raise _unreadable(local, err) from None


def _unreadable(path: Path, err: BaseException) -> CorruptCheckpointError:
    # torch's unpickling errors advise loading with weights_only=False, which would run
    # whatever code a damaged or foreign file holds: keep only what went wrong.
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
        text = text.strip().split(". ", 1)[0].split("\n", 1)[0].strip().rstrip(".")
    else:
        text = next((line.strip() for line in text.splitlines() if line.strip()), "")
        if "weights_only" in text or "Weights only" in text:
            text = ""
    reason = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return CorruptCheckpointError(
        f"checkpoint file {path} is damaged or not a checkpoint: its contents cannot be read "
        f"({reason}); resume from another checkpoint (e.g. the step*.ckpt beside it)"
    )


def verify_checkpoint(path: str | os.PathLike[str]) -> None:
    """Checks that ``path`` is a whole ``torch.save`` archive, without unpickling anything.

    ``torch.load`` never checks the archive's CRC-32 checksums, so flipped bits in tensor data
    load silently; this reads every member and compares its checksum.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        IsADirectoryError: If ``path`` is a folder.
        CorruptCheckpointError: If the file is cut short, is not a zip archive, is a zip
            archive but not a ``torch.save`` one, or a member fails its checksum.

    Example:
        >>> import tempfile, pathlib, torch
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "last.ckpt"
        >>> torch.save({"w": torch.ones(2)}, path)
        >>> verify_checkpoint(path)
        >>> _ = path.write_bytes(b"not a checkpoint")
        >>> verify_checkpoint(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        metalight.lightning.checkpoint_io.CorruptCheckpointError: checkpoint file ... (16 bytes) ...
    """
    local = Path(path)
    if local.is_dir():
        raise IsADirectoryError(
            f"checkpoint path {local} is a directory, not a checkpoint file; give a .ckpt file "
            f"in it, e.g. {local / 'last.ckpt'}",
        )
    if not local.exists():
        raise FileNotFoundError(f"checkpoint file {local} does not exist")
    size = local.stat().st_size
    if not zipfile.is_zipfile(local):
        raise CorruptCheckpointError(
            f"checkpoint file {local} ({size} bytes) is truncated or is not a checkpoint: it is "
            "not a complete torch.save archive. It was probably cut short while being written; "
            "resume from an earlier checkpoint (saves through AtomicCheckpointIO cannot leave "
            "a partial file)"
        )
    try:
        with zipfile.ZipFile(local) as archive:
            names = archive.namelist()
            if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
                raise CorruptCheckpointError(
                    f"checkpoint file {local} ({size} bytes) is a zip archive but not a "
                    f"torch.save checkpoint (it holds {', '.join(names[:3]) or 'nothing'}"
                    f"{', ...' if len(names) > 3 else ''}); give the .ckpt file a run saved"
                )
            bad = archive.testzip()
    except CorruptCheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CorruptCheckpointError(
            f"checkpoint file {local} ({size} bytes) is damaged: its archive cannot be read "
            f"({err}); resume from another checkpoint (e.g. the step*.ckpt beside it)"
        ) from None
    if bad is not None:
        raise CorruptCheckpointError(
            f"checkpoint file {local} is damaged: {bad} fails its CRC-32 checksum (the bytes "
            "changed on disk after it was saved); resume from another checkpoint (e.g. the "
            "step*.ckpt beside it)"
        )


def load_checkpoint_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Loads a whole checkpoint on the CPU, tensors and plain values only (never code).

    Args:
        path: A ``.ckpt`` file written by Lightning or ``torch.save``.

    Returns:
        The checkpoint dictionary.

    Raises:
        FileNotFoundError, IsADirectoryError, CorruptCheckpointError: as
            :func:`verify_checkpoint`, or when it holds something else than a dictionary
            of tensors and plain values.

    Example:
        >>> import tempfile, pathlib, torch
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "last.ckpt"
        >>> torch.save({"global_step": 3}, path)
        >>> load_checkpoint_file(path)["global_step"]
        3
    """
    local = Path(path)
    verify_checkpoint(local)
    try:
        checkpoint = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as err:
        raise _unreadable(local, err) from None
    if not isinstance(checkpoint, dict):
        raise CorruptCheckpointError(
            f"checkpoint file {local} holds a {type(checkpoint).__name__}, not a checkpoint "
            "dictionary"
        )
    return checkpoint
