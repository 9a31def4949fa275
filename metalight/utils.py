"""Small helpers with higher's names (``metalight.utils`` ~ ``higher.utils``).

Code written for facebookresearch/higher sometimes calls the private helpers of its
``higher.utils`` module as well (``_recursive_map`` to walk nested containers,
``_get_param_mapping`` for tied weights); they keep their names, signatures and semantics
here so that such code runs after ``import metalight as higher``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "_copy_tensor",
    "_find_param_in_list",
    "_get_param_mapping",
    "_is_container",
    "_recursive_copy_and_cast",
    "_recursive_map",
    "flatten",
    "get_func_params",
]

_T = TypeVar("_T")

# The containers higher's helpers walk into; anything else is a leaf.
_CONTAINERS = (list, tuple, dict, set)


def _copy_tensor(t: Tensor, safe_copy: bool, device: torch.device | str | None = None) -> Tensor:
    """A detached tensor with ``t``'s ``requires_grad``, cloned when ``safe_copy``.

    Without ``safe_copy`` the result shares ``t``'s storage (a detached alias), as in higher.

    Example:
        >>> import torch
        >>> from metalight.utils import _copy_tensor
        >>> w = torch.ones(2, requires_grad=True)
        >>> c = _copy_tensor(w, safe_copy=True)
        >>> c.requires_grad, c.grad_fn is None, c.data_ptr() != w.data_ptr()
        (True, True, True)
    """
    copy = t.detach().clone() if safe_copy else t.detach()
    copy.requires_grad_(t.requires_grad)
    return copy if device is None else copy.to(device)


def _recursive_map(target: _T, map_fn: Callable[[Any], Any]) -> _T:
    """Apply ``map_fn`` to every leaf of nested lists, tuples, dicts and sets.

    Containers are rebuilt with their own type (named tuples included); dict keys are kept.

    Example:
        >>> from metalight.utils import _recursive_map
        >>> _recursive_map({"a": [1, (2, 3)], "b": {4}}, lambda x: x * 10)
        {'a': [10, (20, 30)], 'b': {40}}
    """
    if isinstance(target, dict):
        return type(target)((k, _recursive_map(v, map_fn)) for k, v in target.items())
    if isinstance(target, tuple) and hasattr(target, "_fields"):
        return type(target)(*(_recursive_map(x, map_fn) for x in target))
    if isinstance(target, list | tuple | set):
        return type(target)(_recursive_map(x, map_fn) for x in target)
    return map_fn(target)  # type: ignore[no-any-return]


def _recursive_copy_and_cast(target: _T, device: torch.device | str | None) -> _T:
    """Nested containers with every tensor replaced by a detached copy on ``device``.

    Example:
        >>> import torch
        >>> from metalight.utils import _recursive_copy_and_cast
        >>> w = torch.ones(2, requires_grad=True)
        >>> out = _recursive_copy_and_cast({"w": [w], "n": 3}, None)
        >>> out["n"], out["w"][0] is w, out["w"][0].requires_grad
        (3, False, True)
    """

    def copy_leaf(x: Any) -> Any:
        return _copy_tensor(x, True, device=device) if isinstance(x, Tensor) else x

    return _recursive_map(target, copy_leaf)


def _is_container(target: Any) -> bool:
    """Whether ``target`` is a list, tuple, dict or set (what the helpers here walk into).

    Example:
        >>> from metalight.utils import _is_container
        >>> _is_container((1,)), _is_container("ab")
        (True, False)
    """
    return isinstance(target, _CONTAINERS)


def _find_param_in_list(param: Tensor, l: Iterable[Tensor]) -> int | None:
    """The index of ``param`` in ``l`` by identity (not by value), or None.

    Example:
        >>> import torch
        >>> from metalight.utils import _find_param_in_list
        >>> a, b = torch.zeros(1), torch.zeros(1)
        >>> _find_param_in_list(b, [a, b]), _find_param_in_list(torch.zeros(1), [a, b])
        (1, None)
    """
    for i, p in enumerate(l):
        if p is param:
            return i
    return None


def _get_param_mapping(module: nn.Module, seen: list[Tensor], mapping: list[int]) -> list[int]:
    """For every parameter slot of ``module`` (tied ones repeated), its index among distinct ones.

    The module tree is walked depth first: a module's own parameters in registration order,
    then its children; a child used at several places is walked each time. Each slot appends
    to ``mapping`` the index of its tensor in ``seen``, which collects the distinct tensors in
    the order of first appearance (``module.parameters()``'s order). Both lists are extended
    in place and ``mapping`` is returned.

    Example:
        >>> import torch
        >>> from metalight.utils import _get_param_mapping
        >>> shared = torch.nn.Linear(2, 2)
        >>> net = torch.nn.Sequential(shared, torch.nn.Tanh(), shared)
        >>> _get_param_mapping(net, [], [])
        [0, 1, 0, 1]
    """
    for param in module._parameters.values():
        if param is None:
            continue
        found = _find_param_in_list(param, seen)
        if found is None:
            mapping.append(len(seen))
            seen.append(param)
        else:
            mapping.append(found)
    for child in module._modules.values():
        if child is not None:
            _get_param_mapping(child, seen, mapping)
    return mapping


def flatten(x: Any) -> list[Any]:
    """Flatten nested lists, tuples, sets and dicts (values, in order) into one list.

    Example:
        >>> from metalight.utils import flatten
        >>> flatten([1, (2, [3]), {"a": 4}])
        [1, 2, 3, 4]
    """
    if isinstance(x, dict):
        return [leaf for v in x.values() for leaf in flatten(v)]
    if isinstance(x, list | tuple | set):
        return [leaf for v in x for leaf in flatten(v)]
    return [x]


def get_func_params(
    module: nn.Module, device: torch.device | str | None = None, safe_copy: bool = True
) -> list[Tensor]:
    """The module's parameters as detached tensors that keep their ``requires_grad``.

    Args:
        module: the module.
        device: move the tensors there.
        safe_copy: clone (the default); False gives detached aliases sharing the
            parameters' storage, as in higher.

    Example:
        >>> import torch
        >>> from metalight.utils import get_func_params
        >>> params = get_func_params(torch.nn.Linear(2, 1))
        >>> [tuple(p.shape) for p in params]
        [(1, 2), (1,)]
    """
    return [_copy_tensor(p, safe_copy, device) for p in module.parameters()]
