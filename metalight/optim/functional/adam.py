"""Functional Adam and AdamW (with AMSGrad, coupled or decoupled weight decay, maximize).

Mirror :class:`torch.optim.Adam` and :class:`torch.optim.AdamW` (single-tensor implementation).
With gradient ``g``, parameter ``p``, step count ``t`` (a Python int), ``betas = (b1, b2)``::

    g <- -g                                            (if maximize)
    p <- p * (1 - lr * wd)                             (decoupled weight decay: AdamW)
    g <- g + wd * p                                    (coupled weight decay: Adam)
    m <- lerp(m, g, 1 - b1)
    v <- b2 * v + (1 - b2) * g * g
    v_max <- max(v_max, v)                             (if amsgrad; then v_max replaces v below)
    p <- p - lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)

The bias corrections are computed from the integer step in double precision when the betas are
Python numbers. ``sqrt`` is :func:`~metalight.optim.functional.core.safe_sqrt`, so entries whose
gradient is always zero give finite meta-gradients.

Example:
    >>> import torch
    >>> from metalight.optim.functional import adam
    >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
    >>> state = adam.init([w])
    >>> (g,) = torch.autograd.grad((w**2).sum(), [w], create_graph=True)
    >>> (w1,), state = adam.update([g], state, [w], lr=0.1)
    >>> w1.detach()
    tensor([ 0.9000, -1.9000])
    >>> state.step
    [1]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
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
)

__all__ = ["AdamState", "adam", "adam_init", "adam_update", "adamw", "adamw_init", "adamw_update"]

ADAM_DEFAULTS = freeze_defaults(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    amsgrad=False,
    maximize=False,
    decoupled_weight_decay=False,
)
ADAMW_DEFAULTS = freeze_defaults(
    lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False
)


class AdamState(NamedTuple):
    """State of :data:`adam` and :data:`adamw`; mirrors :class:`torch.optim.Adam`'s state.

    Attributes:
        step: Number of steps taken per parameter (Python int).
        exp_avg: First-moment estimates.
        exp_avg_sq: Second-moment estimates.
        max_exp_avg_sq: Running maxima of ``exp_avg_sq`` (``None`` without amsgrad).
    """

    step: list[int | float]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]
    max_exp_avg_sq: list[Tensor | None]


def _init(params: Sequence[Tensor], hp: Mapping[str, Any]) -> AdamState:
    return AdamState(
        step=[0 for _ in params],
        exp_avg=[torch.zeros_like(p) for p in params],
        exp_avg_sq=[torch.zeros_like(p) for p in params],
        max_exp_avg_sq=[torch.zeros_like(p) if hp["amsgrad"] else None for p in params],
    )


def adam_init(params: Sequence[Tensor], **hparams: Any) -> AdamState:
    """Initial :class:`AdamState` (zero moments; ``max_exp_avg_sq`` only with amsgrad).

    Args:
        params: The parameters.
        **hparams: Hyperparameters of :data:`adam` (``amsgrad`` is used).

    Returns:
        The initial state.
    """
    return _init(params, resolve_hparams("adam", hparams, ADAM_DEFAULTS))


def adamw_init(params: Sequence[Tensor], **hparams: Any) -> AdamState:
    """Initial :class:`AdamState` for :data:`adamw` (see :func:`adam_init`).

    Args:
        params: The parameters.
        **hparams: Hyperparameters of :data:`adamw` (``amsgrad`` is used).

    Returns:
        The initial state.
    """
    return _init(params, resolve_hparams("adamw", hparams, ADAMW_DEFAULTS))


def _adam_kernel(
    param: Tensor,
    grad: Tensor,
    st: dict[str, Any],
    hp: Mapping[str, Any],
    *,
    decoupled: bool,
) -> tuple[Tensor, dict[str, Any]]:
    lr, eps, weight_decay = hp["lr"], hp["eps"], hp["weight_decay"]
    beta1, beta2 = hp["betas"]
    if hp["maximize"]:
        grad = -grad
    step = st["step"] + 1
    if is_active(weight_decay):
        if decoupled:
            param = param * (1 - lr * weight_decay)
        else:
            grad = add(grad, param, weight_decay)
    exp_avg = lerp(st["exp_avg"], grad, 1 - beta1)
    exp_avg_sq = addcmul(st["exp_avg_sq"] * beta2, grad, grad, 1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    max_exp_avg_sq = st["max_exp_avg_sq"]
    if hp["amsgrad"]:
        max_exp_avg_sq = (
            exp_avg_sq if max_exp_avg_sq is None else torch.maximum(max_exp_avg_sq, exp_avg_sq)
        )
        denom = safe_sqrt(max_exp_avg_sq) / bias_correction2_sqrt + eps
    else:
        denom = safe_sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
    new_param = addcdiv(param, exp_avg, denom, -step_size)
    return new_param, {
        "step": step,
        "exp_avg": exp_avg,
        "exp_avg_sq": exp_avg_sq,
        "max_exp_avg_sq": max_exp_avg_sq,
    }


def adam_update(
    grads: Sequence[Tensor | None], state: AdamState, params: Sequence[Tensor], **hparams: Any
) -> tuple[list[Tensor], AdamState]:
    """One differentiable Adam step (see the module docstring for the rule).

    Args:
        grads: One gradient per parameter; ``None`` leaves the parameter and its state unchanged.
        state: Current :class:`AdamState`.
        params: The parameters.
        **hparams: ``lr``, ``betas`` (pair), ``eps``, ``weight_decay`` (numbers or tensors),
            ``amsgrad``, ``maximize``, ``decoupled_weight_decay`` (bools).

    Returns:
        ``(new_params, new_state)``.
    """
    hp = resolve_hparams("adam", hparams, ADAM_DEFAULTS)
    kernel = partial(_adam_kernel, decoupled=hp["decoupled_weight_decay"])
    return apply_per_parameter(kernel, grads, state, params, hp)


def adamw_update(
    grads: Sequence[Tensor | None], state: AdamState, params: Sequence[Tensor], **hparams: Any
) -> tuple[list[Tensor], AdamState]:
    """One differentiable AdamW step: Adam with decoupled weight decay.

    Args:
        grads: One gradient per parameter; ``None`` leaves the parameter and its state unchanged.
        state: Current :class:`AdamState`.
        params: The parameters.
        **hparams: ``lr``, ``betas`` (pair), ``eps``, ``weight_decay`` (numbers or tensors),
            ``amsgrad``, ``maximize`` (bools).

    Returns:
        ``(new_params, new_state)``.
    """
    hp = resolve_hparams("adamw", hparams, ADAMW_DEFAULTS)
    kernel = partial(_adam_kernel, decoupled=True)
    return apply_per_parameter(kernel, grads, state, params, hp)


adam = FunctionalOptimizer(
    name="adam", init=adam_init, update=adam_update, defaults=ADAM_DEFAULTS, state_type=AdamState
)
"""Functional counterpart of :class:`torch.optim.Adam`."""

adamw = FunctionalOptimizer(
    name="adamw",
    init=adamw_init,
    update=adamw_update,
    defaults=ADAMW_DEFAULTS,
    state_type=AdamState,
)
"""Functional counterpart of :class:`torch.optim.AdamW` (decoupled weight decay)."""
