"""Meta-SGD: learnable per-parameter inner learning rates."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from metalight.lightning.module import MetaLearningModule

__all__ = ["MetaSGD"]


class MetaSGD(MetaLearningModule):
    """Meta-SGD (Li et al., 2017): the inner step is ``w - alpha * grad`` with a learned
    ``alpha`` of the same shape as ``w``, meta-learned together with the initial weights.

    Args:
        model: the network.
        inner_lr: initial value of every entry of ``alpha``.
        **kwargs: as for :class:`~metalight.lightning.MetaLearningModule` (the inner
            optimizer is plain SGD).

    Example:
        >>> from metalight.algorithms import MetaSGD
        >>> from metalight.models import MLP
        >>> meta_sgd = MetaSGD(MLP(), inner_lr=0.01)
        >>> len(meta_sgd.inner_lrs) == len(list(meta_sgd.model.parameters()))
        True
    """

    # The inner SGD is built from inner_lr (saved as such), not passed in.
    _saved_factories = ("outer_optim", "scheduler")

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, **kwargs: Any) -> None:
        if kwargs.pop("inner_optim", None) is not None:
            raise ValueError("MetaSGD's inner optimizer is SGD with learned rates; use inner_lr")
        kwargs.setdefault("learn_inner_lr", "per_parameter")
        super().__init__(
            model, inner_optim=functools.partial(torch.optim.SGD, lr=inner_lr), **kwargs
        )
