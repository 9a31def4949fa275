"""User-facing errors of the ``metalight`` command and their one-line rendering."""

from __future__ import annotations

import re
from typing import Any

from hydra.errors import HydraException, InstantiationException
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from metalight.data._validation import DataArgumentError
from metalight.lightning.checkpoint_io import DiskFullError
from metalight.lightning.module import NonFiniteError

__all__ = ["ConfigError", "config_key", "format_error", "is_user_error"]


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
# Data and Trainer arguments whose config key is not ``data.<argument>``.
_KEYS = {"seed": "seed", "limit_val_batches": "trainer.limit_val_batches"}
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


def config_key(argument: str) -> str:
    """The config key of a data module's (or the Trainer's) constructor argument.

    Example:
        >>> config_key("meta_batch_size"), config_key("seed")
        ('data.meta_batch_size', 'seed')
    """
    return _KEYS.get(argument, f"data.{argument}")


def _setting(key: str, value: Any) -> str:
    if value is None:
        return key
    shown = str(value).lower() if isinstance(value, bool) else value
    return f"{key}={shown}"


def _run_dir_error(exc: InterpolationResolutionError) -> str | None:
    # Hydra resolves the run directory (under paths.output_dir) before anything else; an
    # unusable folder surfaces as an interpolation error that names no key.
    cause: BaseException | None = exc
    seen = 0
    while cause is not None and not isinstance(cause, OSError) and seen < 10:
        # OmegaConf raises the resolver's error again while handling it: follow the context.
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    if not isinstance(cause, OSError):
        return None
    where = f" ({cause.filename})" if cause.filename else ""
    return (
        f"paths.output_dir cannot hold run directories{where}: "
        f"{cause.strerror or type(cause).__name__}; set paths.output_dir to a folder you can "
        "write to (it is created if missing)"
    )


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
    if isinstance(exc, DataArgumentError) and exc.arguments:
        keys = ", ".join(_setting(config_key(k), v) for k, v in exc.arguments.items())
        return f"{_one_line(str(exc))} (config: {keys})"
    resolving = exc if isinstance(exc, InterpolationResolutionError) else exc.__cause__
    if isinstance(resolving, InterpolationResolutionError):
        run_dir = _run_dir_error(resolving)
        if run_dir is not None:
            return run_dir
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
