"""User-facing errors of the ``metalight`` command and their one-line rendering."""

from __future__ import annotations

import re

from hydra.errors import HydraException, InstantiationException
from omegaconf.errors import OmegaConfBaseException

from metalight.lightning.checkpoint_io import DiskFullError
from metalight.lightning.module import NonFiniteError

__all__ = ["ConfigError", "format_error", "is_user_error"]


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which override fixes it.

    Example:
        >>> str(ConfigError("data.ways must be >= 2, got 1"))
        'data.ways must be >= 2, got 1'
    """


_USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    HydraException,
    OmegaConfBaseException,
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    DiskFullError,
    NonFiniteError,
)
_MISSING_OPTION = re.compile(r"Could not (?:find|load) '([^']+)/([^']+)'")
_FULL_KEY = re.compile(r"full_key:\s*(\S+)")
_TARGET = re.compile(r"target '([^']+)'")
_NOISE = ("Config search path", "provider=", "object_type=", "full_key:", "reference_type=")


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from what the user asked for (a config, a path, a value) rather
    than from a bug, so that one line says it better than a traceback.

    Example:
        >>> is_user_error(ConfigError("bad")), is_user_error(KeyError("x"))
        (True, False)
    """
    return isinstance(exc, _USER_ERRORS)


def _options(message: str) -> list[str]:
    lines = message.splitlines()
    for index, line in enumerate(lines):
        if line.strip().startswith("Available options in"):
            options = []
            for option in lines[index + 1 :]:
                if not option.startswith(("\t", " ")) or not option.strip():
                    break
                options.append(option.strip())
            return options
    return []


def _one_line(message: str) -> str:
    parts: list[str] = []
    listing = False
    for raw in message.splitlines():
        line = raw.strip()
        if not line or line.startswith(_NOISE):
            listing = False
            continue
        if listing and raw[:1] in ("\t", " "):
            parts[-1] += ("" if parts[-1].endswith(":") else ",") + " " + line
            continue
        listing = line.endswith(":")
        parts.append(line)
    ended = [p if p.endswith((".", ":", "!", "?")) else p + "." for p in parts[:-1]]
    return " ".join([*ended, *parts[-1:]])


def format_error(exc: BaseException) -> str:
    """One clear line for a user error (no traceback).

    Hydra's "Could not find 'group/option'" becomes a list of the valid options,
    instantiation errors name the config key and the underlying message.

    Example:
        >>> format_error(ConfigError("data.ways must be an integer >= 2, got 'x'"))
        "data.ways must be an integer >= 2, got 'x'"
    """
    if isinstance(exc, InstantiationException):
        text = str(exc)
        key = _FULL_KEY.search(text)
        target = _TARGET.search(text)
        cause = exc.__cause__
        detail = _one_line(str(cause)) if cause is not None else _one_line(text)
        where = key.group(1) if key else "an object"
        what = f" ({target.group(1)})" if target else ""
        return f"could not build {where}{what}: {detail}"
    message = str(exc)
    missing = _MISSING_OPTION.search(message)
    if missing:
        group, name = missing.groups()
        options = ", ".join(_options(message)) or "none"
        if group == "recipe":
            return (
                f"unknown recipe {name!r}; available recipes: {options} "
                "(`metalight recipes` describes them)"
            )
        return f"unknown option {name!r} for config group {group!r}; available: {options}"
    text = _one_line(message)
    cause = exc.__cause__
    if isinstance(exc, HydraException) and isinstance(cause, OmegaConfBaseException):
        extra = _one_line(str(cause))
        if extra and extra not in text:
            text = f"{text} {extra}"
    if isinstance(exc, FileNotFoundError | NotADirectoryError) and not text:
        text = f"{exc.filename}: no such file or directory"
    return text or type(exc).__name__
