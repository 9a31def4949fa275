"""Functional RMSprop (optionally centered, with momentum).

Mirrors :class:`torch.optim.RMSprop` (single-tensor implementation). With gradient ``g``,
parameter ``p``, smoothing constant ``alpha``, squared average ``v``, gradient average ``m``
(centered only) and momentum buffer ``b``::

    g <- -g                                       (if maximize)
    g <- g + wd * p                               (if wd != 0)
    v <- alpha * v + (1 - alpha) * g * g
    m <- lerp(m, g, 1 - alpha)                    (if centered)
    a <- sqrt(v - m * m) + eps   (centered)   or   a <- sqrt(v) + eps
    b <- momentum * b + g / a;  p <- p - lr * b   (if momentum > 0)
    p <- p - lr * g / a                           (otherwise)

Example:
    >>> import torch
    >>> from metalight.optim.functional import rmsprop
    >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
    >>> state = rmsprop.init([w])
    >>> (g,) = torch.autograd.grad((w**2).sum(), [w], create_graph=True)
    >>> (w1,), state = rmsprop.update([g], state, [w], lr=0.01, alpha=0.99)
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
    addcmul,
    apply_per_parameter,
    freeze_defaults,
    is_active,
    lerp,
    resolve_hparams,
    safe_sqrt,
)

__all__ = ["RMSpropState", "rmsprop", "rmsprop_init", "rmsprop_update"]

RMSPROP_DEFAULTS = freeze_defaults(
    lr=1e-2,
    alpha=0.99,
    eps=1e-8,
    weight_decay=0.0,
    momentum=0.0,
    centered=False,
    maximize=False,
)


class RMSpropState(NamedTuple):
    """State of :data:`rmsprop`; mirrors :class:`torch.optim.RMSprop`'s state.

    Attributes:
        step: Number of steps taken per parameter (Python int).
        square_avg: Running average of squared gradients.
        momentum_buffer: Momentum buffers (``None`` without momentum).
        grad_avg: Running average of gradients (``None`` unless centered).
    """

    step: list[int | float]
    square_avg: list[Tensor]
    momentum_buffer: list[Tensor | None]
    grad_avg: list[Tensor | None]


def _has_momentum(momentum: Any) -> bool:
    return isinstance(momentum, Tensor) or momentum > 0


def rmsprop_init(params: Sequence[Tensor], **hparams: Any) -> RMSpropState:
    """Initial :class:`RMSpropState` (zeros; buffers only where ``torch.optim`` has them).

    Args:
        params: The parameters.
        **hparams: Hyperparameters (``momentum`` and ``centered`` are used).

    Returns:
        The initial state.
    """
    hp = resolve_hparams("rmsprop", hparams, RMSPROP_DEFAULTS)
    with_momentum = _has_momentum(hp["momentum"])
    return RMSpropState(
        step=[0 for _ in params],
        square_avg=[torch.zeros_like(p) for p in params],
        momentum_buffer=[torch.zeros_like(p) if with_momentum else None for p in params],
        grad_avg=[torch.zeros_like(p) if hp["centered"] else None for p in params],
    )


def _rmsprop_kernel(
    param: Tensor, grad: Tensor, st: dict[str, Any], hp: Mapping[str, Any]
) -> tuple[Tensor, dict[str, Any]]:
    lr, alpha, eps, momentum = hp["lr"], hp["alpha"], hp["eps"], hp["momentum"]
    if hp["maximize"]:
        grad = -grad
    step = st["step"] + 1
    if is_active(hp["weight_decay"]):
        grad = add(grad, param, hp["weight_decay"])
    square_avg = addcmul(st["square_avg"] * alpha, grad, grad, 1 - alpha)
    changed: dict[str, Any] = {"step": step, "square_avg": square_avg}
    if hp["centered"]:
        grad_avg = st["grad_avg"]
        grad_avg = lerp(torch.zeros_like(grad) if grad_avg is None else grad_avg, grad, 1 - alpha)
        changed["grad_avg"] = grad_avg
        avg = safe_sqrt(torch.addcmul(square_avg, grad_avg, grad_avg, value=-1))
    else:
        avg = safe_sqrt(square_avg)
    avg = avg + eps
    if _has_momentum(momentum):
        buf = st["momentum_buffer"]
        buf = torch.zeros_like(grad) if buf is None else buf
        buf = torch.addcdiv(buf * momentum, grad, avg)
        changed["momentum_buffer"] = buf
        new_param = add(param, buf, -lr)
    else:
        new_param = addcdiv(param, grad, avg, -lr)
    return new_param, changed


def rmsprop_update(
    grads: Sequence[Tensor | None],
    state: RMSpropState,
    params: Sequence[Tensor],
    **hparams: Any,
) -> tuple[list[Tensor], RMSpropState]:
    """One differentiable RMSprop step (see the module docstring for the rule).

    Args:
        grads: One gradient per parameter; ``None`` leaves the parameter and its state unchanged.
        state: Current :class:`RMSpropState`.
        params: The parameters.
        **hparams: ``lr``, ``alpha``, ``eps``, ``weight_decay``, ``momentum`` (numbers or
            tensors; a tensor ``momentum`` always uses the momentum buffer), ``centered``,
            ``maximize``.

    Returns:
        ``(new_params, new_state)``.
    """
    hp = resolve_hparams("rmsprop", hparams, RMSPROP_DEFAULTS)
    return apply_per_parameter(_rmsprop_kernel, grads, state, params, hp)


rmsprop = FunctionalOptimizer(
    name="rmsprop",
    init=rmsprop_init,
    update=rmsprop_update,
    defaults=RMSPROP_DEFAULTS,
    state_type=RMSpropState,
)
"""Functional counterpart of :class:`torch.optim.RMSprop`."""
