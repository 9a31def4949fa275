"""Verified, atomic file downloads."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

__all__ = ["download_file", "md5sum"]


def md5sum(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Returns the hex MD5 digest of a file."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    url: str, dest: str | os.PathLike[str], md5: str | None = None, timeout: float = 60.0
) -> Path:
    """Downloads ``url`` to ``dest``, verifying its MD5, via a temporary file and a rename.

    ``dest`` appears only once the whole file has arrived and matched the checksum, so an
    interrupted or corrupt download never leaves a file that looks complete.

    Args:
        url: Source URL (``https://``, or ``file://`` for local mirrors).
        dest: Final file path; its folder is created if missing.
        md5: Expected hex MD5 digest, or ``None`` to skip verification.
        timeout: Socket timeout in seconds.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: On network errors or a checksum mismatch (then nothing is written).

    Example:
        >>> download_file(  # doctest: +SKIP
        ...     "https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip",
        ...     "data/omniglot/images_background.zip", md5="68d2efa1b9178cc56df9314c21c6e718")
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
        if md5 is not None and digest.hexdigest() != md5.lower():
            raise OSError(
                f"checksum mismatch for {url}: expected MD5 {md5}, got {digest.hexdigest()}. "
                f"The download is incomplete or the file changed upstream; retry, or fetch it "
                f"by hand and save it as {dest}."
            )
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest
