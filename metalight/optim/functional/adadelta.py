"""Functional Adadelta.

Mirrors :class:`torch.optim.Adadelta` (single-tensor implementation). With gradient ``g``,
parameter ``p``, decay ``rho``, running averages ``s`` (squared gradients) and ``a`` (squared
updates)::

    g <- -g                                       (if maximize)
    g <- g + wd * p                               (if wd != 0)
    s <- rho * s + (1 - rho) * g * g
    d <- sqrt(a + eps) / sqrt(s + eps) * g
    a <- rho * a + (1 - rho) * d * d
    p <- p - lr * d

Example:
    >>> import torch
    >>> from metalight.optim.functional import adadelta
    >>> w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    >>> state = adadelta.init([w])
    >>> (g,) = torch.autograd.grad((w**2).sum(), [w], create_graph=True)
    >>> (w1,), state = adadelta.update([g], state, [w], lr=1.0, rho=0.9)
    >>> [round(x, 6) for x in w1.tolist()]
    [0.996838, -1.996838]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metalight.optim.functional.core import (
    FunctionalOptimizer,
    add,
    addcmul,
    apply_per_parameter,
    freeze_defaults,
    is_active,
    resolve_hparams,
    safe_sqrt,
)

__all__ = ["AdadeltaState", "adadelta", "adadelta_init", "adadelta_update"]

ADADELTA_DEFAULTS = freeze_defaults(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False)


class AdadeltaState(NamedTuple):
    """State of :data:`adadelta`; mirrors :class:`torch.optim.Adadelta`'s state.

    Attributes:
        step: Number of steps taken per parameter (Python int).
        square_avg: Running average of squared gradients.
        acc_delta: Running average of squared updates.
    """

    step: list[int | float]
    square_avg: list[Tensor]
    acc_delta: list[Tensor]


def adadelta_init(params: Sequence[Tensor], **hparams: Any) -> AdadeltaState:
    """Initial :class:`AdadeltaState` (zero running averages).

    Args:
        params: The parameters.
        **hparams: Hyperparameters (validated, otherwise unused).

    Returns:
        The initial state.
    """
    resolve_hparams("adadelta", hparams, ADADELTA_DEFAULTS)
    return AdadeltaState(
        step=[0 for _ in params],
        square_avg=[torch.zeros_like(p) for p in params],
        acc_delta=[torch.zeros_like(p) for p in params],
    )


def _adadelta_kernel(
    param: Tensor, grad: Tensor, st: dict[str, Any], hp: Mapping[str, Any]
) -> tuple[Tensor, dict[str, Any]]:
    lr, rho, eps = hp["lr"], hp["rho"], hp["eps"]
    step = st["step"] + 1
    if hp["maximize"]:
        grad = -grad
    if is_active(hp["weight_decay"]):
        grad = add(grad, param, hp["weight_decay"])
    square_avg = addcmul(st["square_avg"] * rho, grad, grad, 1 - rho)
    std = safe_sqrt(square_avg + eps)
    delta = safe_sqrt(st["acc_delta"] + eps) / std * grad
    acc_delta = addcmul(st["acc_delta"] * rho, delta, delta, 1 - rho)
    new_param = add(param, delta, -lr)
    return new_param, {"step": step, "square_avg": square_avg, "acc_delta": acc_delta}


def adadelta_update(
    grads: Sequence[Tensor | None],
    state: AdadeltaState,
    params: Sequence[Tensor],
    **hparams: Any,
) -> tuple[list[Tensor], AdadeltaState]:
    """One differentiable Adadelta step (see the module docstring for the rule).

    Args:
        grads: One gradient per parameter; ``None`` leaves the parameter and its state unchanged.
        state: Current :class:`AdadeltaState`.
        params: The parameters.
        **hparams: ``lr``, ``rho``, ``eps``, ``weight_decay`` (numbers or tensors), ``maximize``.

    Returns:
        ``(new_params, new_state)``.
    """
    hp = resolve_hparams("adadelta", hparams, ADADELTA_DEFAULTS)
    return apply_per_parameter(_adadelta_kernel, grads, state, params, hp)


adadelta = FunctionalOptimizer(
    name="adadelta",
    init=adadelta_init,
    update=adadelta_update,
    defaults=ADADELTA_DEFAULTS,
    state_type=AdadeltaState,
)
"""Functional counterpart of :class:`torch.optim.Adadelta`."""
