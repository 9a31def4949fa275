"""higher-compatible names for functional modules (``metalight.patch`` ~ ``higher.patch``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from metalight import functional
from metalight.functional import FunctionalModule, monkeypatch

__all__ = ["FunctionalModule", "buffer_sync", "make_functional", "monkeypatch"]

# higher's base class of every patched module. Private there too, but code written for higher
# names it in annotations and in ``isinstance(model, higher.patch._MonkeyPatchBase)`` checks
# (already a functional view?), which must keep working after ``import metalight as higher``.
_MonkeyPatchBase = FunctionalModule


def buffer_sync(
    module: nn.Module, fmodule: FunctionalModule, device: torch.device | str | None = None
) -> None:
    """Copy ``module``'s buffers into ``fmodule``'s own copies (a one-off sync).

    The reverse direction, writing an unroll's buffers into the module, is
    :meth:`FunctionalModule.copy_buffers_to_module`.

    Example:
        >>> import torch
        >>> from metalight.patch import buffer_sync, monkeypatch
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> fbn = monkeypatch(bn)
        >>> _ = bn(torch.randn(4, 3))  # the module's running stats move on
        >>> buffer_sync(bn, fbn)
        >>> torch.equal(fbn.running_mean, bn.running_mean)
        True
    """
    fmodule.copy_buffers_from(module, device)


def make_functional(
    module: nn.Module,
    encapsulator: Callable[[FunctionalModule, nn.Module], None] | None = None,
) -> FunctionalModule:
    """A functional view of ``module`` holding no fast weights (higher's signature).

    Args:
        module: the module to view; never modified.
        encapsulator: called once as ``encapsulator(fmodule, module)`` before the view is
            returned, as in higher (e.g. to give it fast weights with ``update_params``).

    Example:
        >>> import torch
        >>> from metalight.patch import make_functional
        >>> model = torch.nn.Linear(2, 1)
        >>> fmodel = make_functional(
        ...     model, lambda fm, m: fm.update_params([p * 2 for p in m.parameters()])
        ... )
        >>> torch.allclose(fmodel(torch.ones(1, 2)), 2 * model(torch.ones(1, 2)))
        True
    """
    fmodule = functional.make_functional(module)
    if encapsulator is not None:
        encapsulator(fmodule, module)
    return fmodule
