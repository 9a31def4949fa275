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
import os
import secrets
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
    "atomic_write",
]

_TMP_SUFFIX = ".tmp"


class CorruptCheckpointError(ValueError):
    """A checkpoint file exists but is not a complete ``torch.save`` archive."""


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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
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
    _atomic_write_with(Path(path), lambda f: f.write(blob))


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
        """Loads a checkpoint, naming the file when it is truncated or not a checkpoint.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            CorruptCheckpointError: If the file is not a complete ``torch.save`` archive
                (e.g. cut short by a writer that was not atomic).
        """
        try:
            return super().load_checkpoint(
                path, map_location=map_location, weights_only=weights_only
            )
        except FileNotFoundError:
            raise
        except Exception as err:
            if not _is_local(path):
                raise
            local = _local_path(path)
            if local.is_file() and not zipfile.is_zipfile(local):
                size = local.stat().st_size
                raise CorruptCheckpointError(
                    f"checkpoint file {local} ({size} bytes) is truncated or is not a "
                    f"checkpoint: it is not a complete torch.save archive ({err}). It was "
                    "probably cut short while being written; resume from an earlier "
                    "checkpoint, and save through AtomicCheckpointIO so that a crash "
                    "cannot leave a partial file"
                ) from err
            raise
