"""higher-compatible names for functional modules (``metalight.patch`` ~ ``higher.patch``)."""

from __future__ import annotations

import torch
from torch import nn

from metalight.functional import FunctionalModule, make_functional, monkeypatch

__all__ = ["FunctionalModule", "buffer_sync", "make_functional", "monkeypatch"]


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
