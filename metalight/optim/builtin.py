"""Differentiable twins of the ``torch.optim`` optimizers.

Each class is a :class:`~metalight.optim.differentiable.FunctionalCoreOptimizer` over the pure
update of the same name in :mod:`metalight.optim.functional`, and is registered for its
``torch.optim`` class, so :func:`metalight.optim.get_diff_optim` finds it.
"""

from __future__ import annotations

import torch

from metalight.optim import functional as F
from metalight.optim.differentiable import FunctionalCoreOptimizer

__all__ = [
    "BUILTIN",
    "DifferentiableASGD",
    "DifferentiableAdadelta",
    "DifferentiableAdagrad",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdamax",
    "DifferentiableNAdam",
    "DifferentiableRAdam",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "DifferentiableSGD",
]


class DifferentiableSGD(FunctionalCoreOptimizer):
    """Differentiable ``torch.optim.SGD`` (momentum, dampening, nesterov, weight decay)."""

    core = F.sgd


class DifferentiableAdam(FunctionalCoreOptimizer):
    """Differentiable ``torch.optim.Adam``; NaN-free meta-gradients at zero second moments."""

    core = F.adam


class DifferentiableAdamW(FunctionalCoreOptimizer):
    """Differentiable ``torch.optim.AdamW`` (decoupled weight decay)."""

    core = F.adamw


class DifferentiableAdadelta(FunctionalCoreOptimizer):
    """Differentiable ``torch.optim.Adadelta``."""

    core = F.adadelta


class DifferentiableAdagrad(FunctionalCoreOptimizer):
    """Differentiable ``torch.optim.Adagrad`` (lr decay, initial accumulator)."""

    core = F.adagrad


class DifferentiableAdamax(FunctionalCoreOptimizer):
    """Differentiable ``torch.optim.Adamax``."""

    core = F.adamax


class DifferentiableASGD(FunctionalCoreOptimizer):
    """Differentiable ``torch.optim.ASGD``."""

    core = F.asgd


class DifferentiableRMSprop(FunctionalCoreOptimizer):
    """Differentiable ``torch.optim.RMSprop`` (centered, momentum)."""

    core = F.rmsprop


class DifferentiableRprop(FunctionalCoreOptimizer):
    """Differentiable ``torch.optim.Rprop``."""

    core = F.rprop


class DifferentiableRAdam(FunctionalCoreOptimizer):
    """Differentiable ``torch.optim.RAdam`` (optionally decoupled weight decay)."""

    core = F.radam


class DifferentiableNAdam(FunctionalCoreOptimizer):
    """Differentiable ``torch.optim.NAdam`` (optionally decoupled weight decay)."""

    core = F.nadam


BUILTIN: dict[type[torch.optim.Optimizer], type[FunctionalCoreOptimizer]] = {
    torch.optim.SGD: DifferentiableSGD,
    torch.optim.Adam: DifferentiableAdam,
    torch.optim.AdamW: DifferentiableAdamW,
    torch.optim.Adadelta: DifferentiableAdadelta,
    torch.optim.Adagrad: DifferentiableAdagrad,
    torch.optim.Adamax: DifferentiableAdamax,
    torch.optim.ASGD: DifferentiableASGD,
    torch.optim.RMSprop: DifferentiableRMSprop,
    torch.optim.Rprop: DifferentiableRprop,
    torch.optim.RAdam: DifferentiableRAdam,
    torch.optim.NAdam: DifferentiableNAdam,
}
