"""Functional RAdam (rectified Adam, optionally with decoupled weight decay).

Mirrors :class:`torch.optim.RAdam` (single-tensor implementation). With gradient ``g``,
parameter ``p``, step count ``t`` and ``betas = (b1, b2)``::

    g <- -g                                       (if maximize)
    p <- p * (1 - lr * wd)   (decoupled)   or   g <- g + wd * p   (if wd != 0)
    m <- lerp(m, g, 1 - b1)
    v <- b2 * v + (1 - b2) * g * g
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
    if rho_t > 5:
        r = sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        p <- p - m / (1 - b1**t) * lr * sqrt(1 - b2**t) / (sqrt(v) + eps) * r
    else:
        p <- p - m / (1 - b1**t) * lr

The rectification switch ``rho_t > 5`` is a Python branch for number betas; for tensor betas it
is an elementwise ``torch.where`` whose untaken branch is evaluated at a safe point, so it never
produces NaN gradients.

Example:
    >>> import torch
    >>> from metalight.optim.functional import radam
    >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
    >>> state = radam.init([w])
    >>> (g,) = torch.autograd.grad((w**2).sum(), [w], create_graph=True)
    >>> (w1,), state = radam.update([g], state, [w], lr=0.1)
    >>> w1.detach()
    tensor([ 0.8000, -1.6000])
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
    lerp,
    resolve_hparams,
    safe_sqrt,
)

__all__ = ["RAdamState", "radam", "radam_init", "radam_update"]

RADAM_DEFAULTS = freeze_defaults(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    decoupled_weight_decay=False,
    maximize=False,
)


class RAdamState(NamedTuple):
    """State of :data:`radam`; mirrors :class:`torch.optim.RAdam`'s state.

    Attributes:
        step: Number of steps taken per parameter (Python int).
        exp_avg: First-moment estimates.
        exp_avg_sq: Second-moment estimates.
    """

    step: list[int | float]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]


def radam_init(params: Sequence[Tensor], **hparams: Any) -> RAdamState:
    """Initial :class:`RAdamState` (zero moments).

    Args:
        params: The parameters.
        **hparams: Hyperparameters (validated, otherwise unused).

    Returns:
        The initial state.
    """
    resolve_hparams("radam", hparams, RADAM_DEFAULTS)
    return RAdamState(
        step=[0 for _ in params],
        exp_avg=[torch.zeros_like(p) for p in params],
        exp_avg_sq=[torch.zeros_like(p) for p in params],
    )


def _rectification(rho_t: Any, rho_inf: Any) -> Any:
    return ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5


def _radam_kernel(
    param: Tensor, grad: Tensor, st: dict[str, Any], hp: Mapping[str, Any]
) -> tuple[Tensor, dict[str, Any]]:
    lr, eps, weight_decay = hp["lr"], hp["eps"], hp["weight_decay"]
    beta1, beta2 = hp["betas"]
    if hp["maximize"]:
        grad = -grad
    step = st["step"] + 1
    if is_active(weight_decay):
        if hp["decoupled_weight_decay"]:
            param = param * (1 - lr * weight_decay)
        else:
            grad = add(grad, param, weight_decay)
    exp_avg = lerp(st["exp_avg"], grad, 1 - beta1)
    exp_avg_sq = addcmul(st["exp_avg_sq"] * beta2, grad, grad, 1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    bias_corrected_exp_avg = exp_avg / bias_correction1
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2

    def adaptive_lr() -> Tensor:
        rate: Tensor = (bias_correction2**0.5) / (safe_sqrt(exp_avg_sq) + eps)
        return rate

    if not isinstance(rho_t, Tensor):
        if rho_t > 5.0:
            update = bias_corrected_exp_avg * lr * adaptive_lr() * _rectification(rho_t, rho_inf)
        else:
            update = bias_corrected_exp_avg * lr
    else:
        rectify = rho_t > 5.0
        # Evaluate the rectification only where it is taken; elsewhere at a harmless point.
        safe_rho_t = torch.where(rectify, rho_t, torch.full_like(rho_t, 6.0))
        safe_rho_inf = torch.where(rectify, rho_inf, torch.full_like(rho_inf, 6.0))
        rect = adaptive_lr() * _rectification(safe_rho_t, safe_rho_inf)
        update = bias_corrected_exp_avg * lr * torch.where(rectify, rect, torch.ones_like(rect))
    new_param = param - update
    return new_param, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def radam_update(
    grads: Sequence[Tensor | None], state: RAdamState, params: Sequence[Tensor], **hparams: Any
) -> tuple[list[Tensor], RAdamState]:
    """One differentiable RAdam step (see the module docstring for the rule).

    Args:
        grads: One gradient per parameter; ``None`` leaves the parameter and its state unchanged.
        state: Current :class:`RAdamState`.
        params: The parameters.
        **hparams: ``lr``, ``betas`` (pair), ``eps``, ``weight_decay`` (numbers or tensors),
            ``decoupled_weight_decay``, ``maximize``.

    Returns:
        ``(new_params, new_state)``.
    """
    hp = resolve_hparams("radam", hparams, RADAM_DEFAULTS)
    return apply_per_parameter(_radam_kernel, grads, state, params, hp)


radam = FunctionalOptimizer(
    name="radam",
    init=radam_init,
    update=radam_update,
    defaults=RADAM_DEFAULTS,
    state_type=RAdamState,
)
"""Functional counterpart of :class:`torch.optim.RAdam`."""
