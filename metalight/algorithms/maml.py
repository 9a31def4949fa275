"""MAML and first-order MAML."""

from __future__ import annotations

from typing import Any

from torch import nn

from metalight.lightning.module import MetaLearningModule

__all__ = ["FOMAML", "MAML"]


class MAML(MetaLearningModule):
    """Model-Agnostic Meta-Learning (Finn et al., 2017), second order.

    The base class's defaults are MAML: adapt every parameter with the inner optimizer,
    differentiate the query loss through the whole unroll.

    Example:
        >>> import functools, torch
        >>> from metalight.algorithms import MAML
        >>> from metalight.models import MLP
        >>> maml = MAML(MLP(), inner_optim=functools.partial(torch.optim.SGD, lr=0.01))
    """


class FOMAML(MetaLearningModule):
    """First-order MAML: the query gradient at the adapted weights is the meta-gradient.

    Example:
        >>> from metalight.algorithms import FOMAML
        >>> from metalight.models import MLP
        >>> fomaml = FOMAML(MLP(), inner_steps=5)
    """

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        kwargs.setdefault("first_order", True)
        if not kwargs["first_order"]:
            raise ValueError("FOMAML is first-order by definition; use MAML for second order")
        super().__init__(model, **kwargs)
