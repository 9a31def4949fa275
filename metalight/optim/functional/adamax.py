"""Functional Adamax (Adam with an infinity-norm second moment).

Mirrors :class:`torch.optim.Adamax` (single-tensor implementation). With gradient ``g``,
parameter ``p``, step count ``t`` and ``betas = (b1, b2)``::

    g <- -g                                       (if maximize)
    g <- g + wd * p                               (if wd != 0)
    m <- lerp(m, g, 1 - b1)
    u <- max(b2 * u, |g| + eps)
    p <- p - lr / (1 - b1**t) * m / u

Example:
    >>> import torch
    >>> from metalight.optim.functional import adamax
    >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
    >>> state = adamax.init([w])
    >>> (g,) = torch.autograd.grad((w**2).sum(), [w], create_graph=True)
    >>> (w1,), state = adamax.update([g], state, [w], lr=0.1)
    >>> w1.detach()
    tensor([ 0.9000, -1.9000])
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
    apply_per_parameter,
    freeze_defaults,
    is_active,
    lerp,
    resolve_hparams,
)

__all__ = ["AdamaxState", "adamax", "adamax_init", "adamax_update"]

ADAMAX_DEFAULTS = freeze_defaults(
    lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False
)


class AdamaxState(NamedTuple):
    """State of :data:`adamax`; mirrors :class:`torch.optim.Adamax`'s state.

    Attributes:
        step: Number of steps taken per parameter (Python int).
        exp_avg: First-moment estimates.
        exp_inf: Exponentially weighted infinity norms.
    """

    step: list[int | float]
    exp_avg: list[Tensor]
    exp_inf: list[Tensor]


def adamax_init(params: Sequence[Tensor], **hparams: Any) -> AdamaxState:
    """Initial :class:`AdamaxState` (zero moments).

    Args:
        params: The parameters.
        **hparams: Hyperparameters (validated, otherwise unused).

    Returns:
        The initial state.
    """
    resolve_hparams("adamax", hparams, ADAMAX_DEFAULTS)
    return AdamaxState(
        step=[0 for _ in params],
        exp_avg=[torch.zeros_like(p) for p in params],
        exp_inf=[torch.zeros_like(p) for p in params],
    )


def _adamax_kernel(
    param: Tensor, grad: Tensor, st: dict[str, Any], hp: Mapping[str, Any]
) -> tuple[Tensor, dict[str, Any]]:
    lr, eps = hp["lr"], hp["eps"]
    beta1, beta2 = hp["betas"]
    if hp["maximize"]:
        grad = -grad
    step = st["step"] + 1
    if is_active(hp["weight_decay"]):
        grad = add(grad, param, hp["weight_decay"])
    exp_avg = lerp(st["exp_avg"], grad, 1 - beta1)
    exp_inf = torch.maximum(st["exp_inf"] * beta2, grad.abs() + eps)
    clr = lr / (1 - beta1**step)
    new_param = addcdiv(param, exp_avg, exp_inf, -clr)
    return new_param, {"step": step, "exp_avg": exp_avg, "exp_inf": exp_inf}


def adamax_update(
    grads: Sequence[Tensor | None],
    state: AdamaxState,
    params: Sequence[Tensor],
    **hparams: Any,
) -> tuple[list[Tensor], AdamaxState]:
    """One differentiable Adamax step (see the module docstring for the rule).

    Args:
        grads: One gradient per parameter; ``None`` leaves the parameter and its state unchanged.
        state: Current :class:`AdamaxState`.
        params: The parameters.
        **hparams: ``lr``, ``betas`` (pair), ``eps``, ``weight_decay`` (numbers or tensors),
            ``maximize``.

    Returns:
        ``(new_params, new_state)``.
    """
    hp = resolve_hparams("adamax", hparams, ADAMAX_DEFAULTS)
    return apply_per_parameter(_adamax_kernel, grads, state, params, hp)


adamax = FunctionalOptimizer(
    name="adamax",
    init=adamax_init,
    update=adamax_update,
    defaults=ADAMAX_DEFAULTS,
    state_type=AdamaxState,
)
"""Functional counterpart of :class:`torch.optim.Adamax`."""
