"""Functional Adagrad (with learning-rate decay and an initial accumulator value).

Mirrors :class:`torch.optim.Adagrad` (single-tensor implementation, dense gradients). With
gradient ``g``, parameter ``p``, step count ``t`` and accumulator ``s`` (initialised to
``initial_accumulator_value``)::

    g <- -g                                       (if maximize)
    g <- g + wd * p                               (if wd != 0)
    clr = lr / (1 + (t - 1) * lr_decay)
    s <- s + g * g
    p <- p - clr * g / (sqrt(s) + eps)

Example:
    >>> import torch
    >>> from metalight.optim.functional import adagrad
    >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
    >>> state = adagrad.init([w])
    >>> (g,) = torch.autograd.grad((w**2).sum(), [w], create_graph=True)
    >>> (w1,), state = adagrad.update([g], state, [w], lr=0.5)
    >>> w1.detach()
    tensor([ 0.5000, -1.5000])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from torch import Tensor

from metalight.optim.functional.core import (
    FunctionalOptimizer,
    add,
    addcdiv,
    addcmul,
    apply_per_parameter,
    filled_like,
    freeze_defaults,
    is_active,
    resolve_hparams,
    safe_sqrt,
)

__all__ = ["AdagradState", "adagrad", "adagrad_init", "adagrad_update"]

ADAGRAD_DEFAULTS = freeze_defaults(
    lr=1e-2,
    lr_decay=0.0,
    weight_decay=0.0,
    initial_accumulator_value=0.0,
    eps=1e-10,
    maximize=False,
)


class AdagradState(NamedTuple):
    """State of :data:`adagrad`; mirrors :class:`torch.optim.Adagrad`'s state.

    Attributes:
        step: Number of steps taken per parameter (Python int).
        sum: Accumulated squared gradients.
    """

    step: list[int | float]
    sum: list[Tensor]


def adagrad_init(params: Sequence[Tensor], **hparams: Any) -> AdagradState:
    """Initial :class:`AdagradState`: accumulators filled with ``initial_accumulator_value``.

    Args:
        params: The parameters.
        **hparams: Hyperparameters (``initial_accumulator_value`` is used; a tensor value keeps
            its autograd history).

    Returns:
        The initial state.
    """
    hp = resolve_hparams("adagrad", hparams, ADAGRAD_DEFAULTS)
    return AdagradState(
        step=[0 for _ in params],
        sum=[filled_like(p, hp["initial_accumulator_value"]) for p in params],
    )


def _adagrad_kernel(
    param: Tensor, grad: Tensor, st: dict[str, Any], hp: Mapping[str, Any]
) -> tuple[Tensor, dict[str, Any]]:
    lr, lr_decay, eps = hp["lr"], hp["lr_decay"], hp["eps"]
    step = st["step"] + 1
    if hp["maximize"]:
        grad = -grad
    if is_active(hp["weight_decay"]):
        grad = add(grad, param, hp["weight_decay"])
    clr = lr / (1 + (step - 1) * lr_decay)
    state_sum = addcmul(st["sum"], grad, grad, 1)
    std = safe_sqrt(state_sum) + eps
    new_param = addcdiv(param, grad, std, -clr)
    return new_param, {"step": step, "sum": state_sum}


def adagrad_update(
    grads: Sequence[Tensor | None],
    state: AdagradState,
    params: Sequence[Tensor],
    **hparams: Any,
) -> tuple[list[Tensor], AdagradState]:
    """One differentiable Adagrad step (see the module docstring for the rule).

    Args:
        grads: One gradient per parameter; ``None`` leaves the parameter and its state unchanged.
        state: Current :class:`AdagradState`.
        params: The parameters.
        **hparams: ``lr``, ``lr_decay``, ``weight_decay``, ``initial_accumulator_value`` (only
            used by init), ``eps`` (numbers or tensors), ``maximize``.

    Returns:
        ``(new_params, new_state)``.
    """
    hp = resolve_hparams("adagrad", hparams, ADAGRAD_DEFAULTS)
    return apply_per_parameter(_adagrad_kernel, grads, state, params, hp)


adagrad = FunctionalOptimizer(
    name="adagrad",
    init=adagrad_init,
    update=adagrad_update,
    defaults=ADAGRAD_DEFAULTS,
    state_type=AdagradState,
)
"""Functional counterpart of :class:`torch.optim.Adagrad` (dense gradients only)."""
