"""Functional NAdam (Adam with Nesterov momentum, optionally decoupled weight decay).

Mirrors :class:`torch.optim.NAdam` (single-tensor implementation). With gradient ``g``,
parameter ``p``, step count ``t``, ``betas = (b1, b2)``, momentum decay ``psi`` and running
product ``mu_product`` (initially 1)::

    g <- -g                                       (if maximize)
    p <- p * (1 - lr * wd)   (decoupled)   or   g <- g + wd * p   (if wd != 0)
    mu_t = b1 * (1 - 0.5 * 0.96 ** (t * psi))
    mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
    mu_product <- mu_product * mu_t
    m <- lerp(m, g, 1 - b1)
    v <- b2 * v + (1 - b2) * g * g
    d = sqrt(v / (1 - b2**t)) + eps
    p <- p - lr * (1 - mu_t) / (1 - mu_product) * g / d
    p <- p - lr * mu_next / (1 - mu_product * mu_next) * m / d

``mu_product`` is a 0-d tensor (float64 for float64 parameters, float32 otherwise).

Example:
    >>> import torch
    >>> from metalight.optim.functional import nadam
    >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
    >>> state = nadam.init([w])
    >>> (g,) = torch.autograd.grad((w**2).sum(), [w], create_graph=True)
    >>> (w1,), state = nadam.update([g], state, [w], lr=0.1)
    >>> [round(x, 4) for x in w1.tolist()]
    [0.8944, -1.8944]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metalight.optim.functional.core import (
    FunctionalOptimizer,
    add,
    addcdiv,
    addcmul,
    apply_per_parameter,
    freeze_defaults,
    is_active,
    lerp,
    resolve_hparams,
    safe_sqrt,
    scalar_tensor,
)

__all__ = ["NAdamState", "nadam", "nadam_init", "nadam_update"]

NADAM_DEFAULTS = freeze_defaults(
    lr=2e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    momentum_decay=4e-3,
    decoupled_weight_decay=False,
    maximize=False,
)


class NAdamState(NamedTuple):
    """State of :data:`nadam`; mirrors :class:`torch.optim.NAdam`'s state.

    Attributes:
        step: Number of steps taken per parameter (Python int).
        mu_product: Running product of the momentum coefficients (0-d tensor).
        exp_avg: First-moment estimates.
        exp_avg_sq: Second-moment estimates.
    """

    step: list[int | float]
    mu_product: list[Tensor]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]


def nadam_init(params: Sequence[Tensor], **hparams: Any) -> NAdamState:
    """Initial :class:`NAdamState` (``mu_product = 1``, zero moments).

    Args:
        params: The parameters.
        **hparams: Hyperparameters (validated, otherwise unused).

    Returns:
        The initial state.
    """
    resolve_hparams("nadam", hparams, NADAM_DEFAULTS)
    return NAdamState(
        step=[0 for _ in params],
        mu_product=[scalar_tensor(1.0, p) for p in params],
        exp_avg=[torch.zeros_like(p) for p in params],
        exp_avg_sq=[torch.zeros_like(p) for p in params],
    )


def _nadam_kernel(
    param: Tensor, grad: Tensor, st: dict[str, Any], hp: Mapping[str, Any]
) -> tuple[Tensor, dict[str, Any]]:
    lr, eps, weight_decay, momentum_decay = (
        hp["lr"],
        hp["eps"],
        hp["weight_decay"],
        hp["momentum_decay"],
    )
    beta1, beta2 = hp["betas"]
    if hp["maximize"]:
        grad = -grad
    step = st["step"] + 1
    bias_correction2 = 1 - beta2**step
    if is_active(weight_decay):
        if hp["decoupled_weight_decay"]:
            param = param * (1 - lr * weight_decay)
        else:
            grad = add(grad, param, weight_decay)
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    mu_product = st["mu_product"] * mu
    exp_avg = lerp(st["exp_avg"], grad, 1 - beta1)
    exp_avg_sq = addcmul(st["exp_avg_sq"] * beta2, grad, grad, 1 - beta2)
    denom = safe_sqrt(exp_avg_sq / bias_correction2) + eps
    if isinstance(mu_product, Tensor) and not mu_product.requires_grad:
        # Like torch.optim: use the running product as a Python scalar.
        mu_product_value: Any = mu_product.item() if mu_product.numel() == 1 else mu_product
    else:
        mu_product_value = mu_product
    mu_product_next = mu_product_value * mu_next
    new_param = addcdiv(param, grad, denom, -lr * (1.0 - mu) / (1.0 - mu_product_value))
    new_param = addcdiv(new_param, exp_avg, denom, (-lr * mu_next) / (1.0 - mu_product_next))
    return new_param, {
        "step": step,
        "mu_product": scalar_tensor(mu_product, param),
        "exp_avg": exp_avg,
        "exp_avg_sq": exp_avg_sq,
    }


def nadam_update(
    grads: Sequence[Tensor | None], state: NAdamState, params: Sequence[Tensor], **hparams: Any
) -> tuple[list[Tensor], NAdamState]:
    """One differentiable NAdam step (see the module docstring for the rule).

    Args:
        grads: One gradient per parameter; ``None`` leaves the parameter and its state unchanged.
        state: Current :class:`NAdamState`.
        params: The parameters.
        **hparams: ``lr``, ``betas`` (pair), ``eps``, ``weight_decay``, ``momentum_decay``
            (numbers or tensors), ``decoupled_weight_decay``, ``maximize``.

    Returns:
        ``(new_params, new_state)``.
    """
    hp = resolve_hparams("nadam", hparams, NADAM_DEFAULTS)
    return apply_per_parameter(_nadam_kernel, grads, state, params, hp)


nadam = FunctionalOptimizer(
    name="nadam",
    init=nadam_init,
    update=nadam_update,
    defaults=NADAM_DEFAULTS,
    state_type=NAdamState,
)
"""Functional counterpart of :class:`torch.optim.NAdam`."""
