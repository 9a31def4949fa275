"""Small helpers with higher's names (``metalight.utils`` ~ ``higher.utils``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["flatten", "get_func_params"]


def flatten(x: Any) -> list[Any]:
    """Flatten nested lists, tuples and dicts (values, in order) into one list.

    Example:
        >>> from metalight.utils import flatten
        >>> flatten([1, (2, [3]), {"a": 4}])
        [1, 2, 3, 4]
    """
    if isinstance(x, dict):
        return [leaf for v in x.values() for leaf in flatten(v)]
    if isinstance(x, Sequence) and not isinstance(x, str | bytes | Tensor):
        return [leaf for v in x for leaf in flatten(v)]
    return [x]


def get_func_params(
    module: nn.Module, device: torch.device | str | None = None, safe_copy: bool = True
) -> list[Tensor]:
    """The module's parameters as a list, detached copies by default.

    Args:
        module: the module.
        device: move the copies there.
        safe_copy: detach and clone (keeping ``requires_grad``); False returns the
            parameters themselves (moved to ``device`` if given).

    Example:
        >>> import torch
        >>> from metalight.utils import get_func_params
        >>> params = get_func_params(torch.nn.Linear(2, 1))
        >>> [tuple(p.shape) for p in params]
        [(1, 2), (1,)]
    """
    params = []
    for p in module.parameters():
        if safe_copy:
            p = p.detach().clone().requires_grad_(p.requires_grad)
        if device is not None:
            p = p.to(device)
        params.append(p)
    return params
