"""Where the Hydra configs and recipes live, and how Hydra is told about them.

The command works from a source checkout (or an editable install) and from a wheel. A wheel
carries ``configs/`` and ``recipes/`` inside the package (``metalight/configs`` and
``metalight/recipes``); a checkout has them at the repository root. Either way ``recipes/`` is
the real folder: its files are registered in Hydra's ``ConfigStore`` as the config group
``recipe``, so ``+recipe=maml`` works wherever the package is installed, without a folder
named ``recipe`` or any extra search-path plugin.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

import metalight

__all__ = [
    "RUN_DIR_RESOLVER",
    "Recipe",
    "config_dir",
    "created_here",
    "list_recipes",
    "make_run_dir",
    "note_created",
    "recipes_dir",
    "register_recipes",
    "register_resolvers",
    "reset_run_dirs",
]

RUN_DIR_RESOLVER = "metalight.run_dir"
"""Name of the OmegaConf resolver that gives each run a fresh directory under a parent."""

_PACKAGE_HEADER = re.compile(r"^#\s*@package\s+(\S+)\s*$")
_RESERVED: dict[str, str] = {}
# Run directories this process created: only those may be removed when a run fails to start.
_CREATED: set[Path] = set()


def note_created(path: str | os.PathLike[str]) -> None:
    """Record that this process created the run directory ``path`` (see :func:`created_here`)."""
    _CREATED.add(Path(path).resolve())


def created_here(path: str | os.PathLike[str]) -> bool:
    """Whether this process created ``path`` (so a failed start may remove it again).

    Example:
        >>> import tempfile
        >>> created_here(make_run_dir(tempfile.mkdtemp())), created_here(tempfile.mkdtemp())
        (True, False)
    """
    return Path(path).resolve() in _CREATED


def _resource_dir(name: str) -> Path:
    package = Path(metalight.__file__).resolve().parent
    for candidate in (package / name, package.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"metalight's {name}/ folder is missing: looked in {package / name} (installed wheel) "
        f"and {package.parent / name} (source checkout); reinstall metalight"
    )


def config_dir() -> Path:
    """The folder of Hydra configs (``train.yaml`` and one folder per config group).

    Returns:
        ``metalight/configs`` inside an installed wheel, else ``configs/`` of the checkout.

    Example:
        >>> (config_dir() / "train.yaml").is_file()
        True
    """
    return _resource_dir("configs")


def recipes_dir() -> Path:
    """The folder of recipes, one YAML file per reproducible experiment.

    Returns:
        ``metalight/recipes`` inside an installed wheel, else ``recipes/`` of the checkout.

    Example:
        >>> (recipes_dir() / "maml.yaml").is_file()
        True
    """
    return _resource_dir("recipes")


@dataclass(frozen=True)
class Recipe:
    """One recipe file and what it says about itself (its ``recipe:`` block).

    Attributes:
        name: the option name, as in ``+recipe=NAME``.
        description: one line on what it trains.
        paper: the paper it reproduces.
        expected: the result the paper reports or the run should reach.
        path: the YAML file.
    """

    name: str
    description: str
    paper: str
    expected: str
    path: Path


def _read_recipe(path: Path) -> tuple[DictConfig, str | None]:
    package = None
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.startswith("#"):
                break
            match = _PACKAGE_HEADER.match(line.strip())
            if match:
                package = match.group(1)
    node = OmegaConf.load(path)
    if not isinstance(node, DictConfig):
        raise ValueError(f"recipe {path} must hold a mapping, not a list")
    return node, package


def list_recipes(directory: str | os.PathLike[str] | None = None) -> list[Recipe]:
    """The recipes, sorted by name.

    Args:
        directory: the recipes folder (default :func:`recipes_dir`).

    Returns:
        One :class:`Recipe` per ``*.yaml`` file.

    Example:
        >>> "maml" in [r.name for r in list_recipes()]
        True
    """
    folder = Path(directory) if directory is not None else recipes_dir()
    recipes = []
    for path in sorted(folder.glob("*.yaml")):
        node, _ = _read_recipe(path)
        info = node.get("recipe") or {}
        recipes.append(
            Recipe(
                name=path.stem,
                description=str(info.get("description", "")),
                paper=str(info.get("paper", "")),
                expected=str(info.get("expected", "")),
                path=path,
            )
        )
    return recipes


def register_recipes(directory: str | os.PathLike[str] | None = None) -> list[str]:
    """Make every recipe file an option of Hydra's ``recipe`` config group.

    Each file is stored in Hydra's ``ConfigStore`` under ``recipe/<name>`` with the package
    its ``# @package`` header names (``_global_`` for all shipped recipes), so
    ``+recipe=<name>`` composes it after the defaults. Safe to call repeatedly.

    Args:
        directory: the recipes folder (default :func:`recipes_dir`).

    Returns:
        The registered recipe names.

    Example:
        >>> "maml" in register_recipes()
        True
    """
    folder = Path(directory) if directory is not None else recipes_dir()
    store = ConfigStore.instance()
    names = []
    for path in sorted(folder.glob("*.yaml")):
        node, package = _read_recipe(path)
        store.store(
            group="recipe", name=path.stem, node=node, package=package, provider="metalight"
        )
        names.append(path.stem)
    return names


def make_run_dir(parent: str | os.PathLike[str], stamp: str | None = None) -> Path:
    """Create and return a new, empty run directory under ``parent``.

    The name is the current time (``2025-01-31_14-05-09``); when that exists already a
    counter is appended (``..._1``, ``..._2``). The directory is created atomically, so two
    runs started in the same second never share one.

    Args:
        parent: where run directories go (created if needed).
        stamp: the base name (default: the current time).

    Returns:
        The new directory.

    Example:
        >>> import tempfile
        >>> parent = tempfile.mkdtemp()
        >>> make_run_dir(parent, "x").name, make_run_dir(parent, "x").name
        ('x', 'x_1')
    """
    base = Path(parent)
    base.mkdir(parents=True, exist_ok=True)
    stamp = stamp or datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    count = 0
    while True:
        candidate = base / (stamp if count == 0 else f"{stamp}_{count}")
        try:
            candidate.mkdir()
        except FileExistsError:
            count += 1
            continue
        note_created(candidate)
        return candidate


def _check_parent(parent: Path) -> None:
    """Raises what creating a folder under ``parent`` would (checked without creating it)."""
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == parent and not parent.is_dir():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(parent))
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(existing))


def _free_name(parent: Path, stamp: str) -> Path:
    count = 0
    while True:
        candidate = parent / (stamp if count == 0 else f"{stamp}_{count}")
        if not candidate.exists():
            return candidate
        count += 1


def _reserved_run_dir(parent: str, mode: str = "create") -> str:
    # Hydra resolves hydra.run.dir more than once (to create it, then for Lightning's DDP
    # launcher), so the name is reserved once per process and parent. A run's directory
    # ("create") is made here, atomically, so two runs started in the same second never
    # share one. A sweep's ("name") is only named: OmegaConf also evaluates values a config
    # file overrides while merging (the default hydra.sweep.dir under hparams_search or in a
    # submitit job), and a folder made then would be left empty; Hydra creates the sweep
    # directory it really uses.
    if mode not in ("create", "name"):
        raise ValueError(f"metalight.run_dir takes 'create' or 'name', got {mode!r}")
    if parent not in _RESERVED:
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        _check_parent(Path(parent))  # an unusable paths.output_dir is named at once
        if mode == "create":
            path = make_run_dir(parent, stamp)
        else:
            path = _free_name(Path(parent), stamp)
            # This process's sweep will create it: a failed start may remove it again.
            note_created(path)
        _RESERVED[parent] = str(path)
    return _RESERVED[parent]


def reset_run_dirs() -> None:
    """Forget the directories reserved by the ``metalight.run_dir`` resolver (one per call
    of the command), so that the next run in this process gets a new one."""
    _RESERVED.clear()


def register_resolvers() -> None:
    """Register the ``${metalight.run_dir:PARENT}`` resolver (idempotent).

    It returns a new run directory under ``PARENT``, chosen on first use and the same for
    every later use in this process until :func:`reset_run_dirs`. It creates the directory
    atomically (two runs started in the same second get ``NAME`` and ``NAME_1``);
    ``${metalight.run_dir:PARENT,name}`` only picks a free name, for a sweep directory that
    Hydra creates when the sweep starts (so a value resolved and then overridden leaves no
    folder behind).

    Example:
        >>> register_resolvers()
        >>> OmegaConf.has_resolver("metalight.run_dir")
        True
    """
    if not OmegaConf.has_resolver(RUN_DIR_RESOLVER):
        OmegaConf.register_new_resolver(RUN_DIR_RESOLVER, _reserved_run_dir)
