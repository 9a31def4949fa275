"""Optimizer and scheduler factories as plain descriptions that a checkpoint can hold.

A :class:`~metalight.lightning.MetaLearningModule` is built from factories such as
``functools.partial(torch.optim.SGD, lr=0.4)``. A factory is code, not data, so Lightning's
``save_hyperparameters`` cannot keep it; without it a module reloaded with
``load_from_checkpoint`` would adapt with another inner optimizer. These helpers turn a
factory into a Hydra-style description (``{"_target_": "torch.optim.sgd.SGD", "_partial_":
True, "lr": 0.4}``) and back. What cannot be described exactly (a lambda, a local function, a
tensor hyperparameter) is stored as ``{"_unsaved_": repr(factory)}``, and the module says on
load which argument to pass.

Example:
    >>> import functools, torch
    >>> from metalight.lightning.factories import build_factory, describe_factory
    >>> description = describe_factory(functools.partial(torch.optim.SGD, lr=0.4))
    >>> description
    {'_target_': 'torch.optim.sgd.SGD', '_partial_': True, 'lr': 0.4}
    >>> build_factory(description, "inner_optim").keywords
    {'lr': 0.4}
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["UNSAVED", "build_factory", "describe_factory", "import_path"]

UNSAVED = "_unsaved_"

_PLAIN = (bool, int, float, str, type(None))


class _NotPlain(Exception):
    pass


def _plain(value: Any) -> Any:
    """``value`` as plain data that a checkpoint and a YAML file keep unchanged in meaning.

    Lists and tuples stay what they are; other sequences and mappings (OmegaConf's
    ``ListConfig`` and ``DictConfig``, from a Hydra partial built without ``_convert_``)
    become lists and dicts. Raises ``_NotPlain`` for anything else (a tensor, an object).
    """
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise _NotPlain
        return {k: _plain(v) for k, v in value.items()}
    raise _NotPlain


def import_path(obj: Any) -> str | None:
    """``module.qualname`` of a class or function that importing finds again, else None."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:  # <lambda>, <locals>
        return None
    path = f"{module}.{qualname}"
    try:
        found = _resolve(path)
    except (ImportError, AttributeError):
        return None
    return path if found is obj else None


def _resolve(path: str) -> Any:
    # The longest importable module prefix, then attributes (nested classes).
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"no module found for {path!r}")


def describe_factory(factory: Callable[..., Any] | None) -> dict[str, Any] | None:
    """A Hydra-style description of ``factory``, or ``{"_unsaved_": repr}`` if impossible.

    Describable: an importable class or function, and a ``functools.partial`` of one (what
    Hydra's ``_partial_: true`` builds) whose arguments are plain values (numbers, strings,
    booleans, None, and lists, tuples and dicts of those).

    Args:
        factory: the factory, or None.

    Returns:
        None for None, else the description.
    """
    if factory is None:
        return None
    func, args, kwargs = factory, (), {}
    if isinstance(factory, functools.partial):
        func, args, kwargs = factory.func, factory.args, dict(factory.keywords)
    path = import_path(func)
    try:
        args, kwargs = _plain(tuple(args)), _plain(dict(kwargs))
    except _NotPlain:
        path = None
    if path is None or "_target_" in kwargs:
        return {UNSAVED: repr(factory)}
    description: dict[str, Any] = {"_target_": path, "_partial_": True}
    if args:
        description["_args_"] = list(args)
    description.update(kwargs)
    return description


def build_factory(description: Any, argument: str) -> Callable[..., Any]:
    """The factory back from :func:`describe_factory`'s description (a factory passes through).

    Args:
        description: a description, or already a callable factory.
        argument: the constructor argument it belongs to, for the error message.

    Raises:
        ValueError: the description marks a factory that could not be saved, or is malformed.
    """
    if not isinstance(description, Mapping):
        if callable(description):
            return description
        raise ValueError(
            f"{argument} must be a factory (e.g. functools.partial(torch.optim.SGD, lr=0.1)) "
            f"or a description {{'_target_': ..., '_partial_': True, ...}}, got {description!r}"
        )
    if UNSAVED in description:
        raise ValueError(
            f"the checkpoint holds no usable {argument}: it was {description[UNSAVED]}, which a "
            "checkpoint cannot store (only importable classes or functions, optionally in "
            f"functools.partial with plain arguments); pass {argument}=... to "
            "load_from_checkpoint"
        )
    kwargs = dict(description)
    target = kwargs.pop("_target_", None)
    kwargs.pop("_partial_", None)
    args = kwargs.pop("_args_", [])
    if not isinstance(target, str):
        raise ValueError(
            f"{argument} description {dict(description)!r} has no '_target_' naming a class "
            "or function to import"
        )
    try:
        func = _resolve(target)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{argument}: cannot import {target!r} ({err})") from None
    return functools.partial(func, *args, **kwargs)
