"""Functional SGD (with momentum, dampening, Nesterov momentum and weight decay).

Mirrors :class:`torch.optim.SGD` (single-tensor implementation). With gradient ``g``, parameter
``p``, learning rate ``lr``, momentum ``mu``, dampening ``tau`` and weight decay ``wd``::

    g <- -g                                       (if maximize)
    g <- g + wd * p                               (if wd != 0)
    b <- g            (first step)                (if mu != 0)
    b <- mu * b + (1 - tau) * g  (later steps)
    g <- g + mu * b   (nesterov)   or   g <- b
    p <- p - lr * g

Example:
    >>> import torch
    >>> from metalight.optim.functional import sgd
    >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
    >>> state = sgd.init([w], momentum=0.9)
    >>> (g,) = torch.autograd.grad((w**2).sum(), [w], create_graph=True)
    >>> (w1,), state = sgd.update([g], state, [w], lr=0.1, momentum=0.9)
    >>> w1.detach()
    tensor([ 0.8000, -1.6000])
    >>> torch.autograd.grad(w1.sum(), w)[0]  # meta-gradient through the step
    tensor([0.8000, 0.8000])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from torch import Tensor

from metalight.optim.functional.core import (
    FunctionalOptimizer,
    add,
    apply_per_parameter,
    freeze_defaults,
    is_active,
    resolve_hparams,
)

__all__ = ["SGDState", "sgd", "sgd_init", "sgd_update"]

SGD_DEFAULTS = freeze_defaults(
    lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False
)


class SGDState(NamedTuple):
    """State of :data:`sgd`; mirrors :class:`torch.optim.SGD`'s per-parameter state.

    Attributes:
        momentum_buffer: Momentum buffer per parameter; ``None`` before the first step or without
            momentum.
    """

    momentum_buffer: list[Tensor | None]


def sgd_init(params: Sequence[Tensor], **hparams: Any) -> SGDState:
    """Initial :class:`SGDState`: no momentum buffers yet (like :class:`torch.optim.SGD`).

    Args:
        params: The parameters.
        **hparams: Hyperparameters (validated, otherwise unused).

    Returns:
        The initial state.
    """
    resolve_hparams("sgd", hparams, SGD_DEFAULTS)
    return SGDState(momentum_buffer=[None for _ in params])


def _sgd_kernel(
    param: Tensor, grad: Tensor, st: dict[str, Any], hp: Mapping[str, Any]
) -> tuple[Tensor, dict[str, Any]]:
    lr, momentum, dampening = hp["lr"], hp["momentum"], hp["dampening"]
    if hp["maximize"]:
        grad = -grad
    if is_active(hp["weight_decay"]):
        grad = add(grad, param, hp["weight_decay"])
    changed: dict[str, Any] = {}
    if is_active(momentum):
        buf = st["momentum_buffer"]
        buf = grad.clone() if buf is None else add(buf * momentum, grad, 1 - dampening)
        changed["momentum_buffer"] = buf
        grad = add(grad, buf, momentum) if hp["nesterov"] else buf
    return add(param, grad, -lr), changed


def sgd_update(
    grads: Sequence[Tensor | None], state: SGDState, params: Sequence[Tensor], **hparams: Any
) -> tuple[list[Tensor], SGDState]:
    """One differentiable SGD step (see the module docstring for the rule).

    Args:
        grads: One gradient per parameter; ``None`` leaves the parameter and its state unchanged.
        state: Current :class:`SGDState`.
        params: The parameters.
        **hparams: ``lr``, ``momentum``, ``dampening``, ``weight_decay`` (numbers or tensors),
            ``nesterov``, ``maximize`` (bools). Tensor ``momentum``/``weight_decay`` are always
            applied, even when zero.

    Returns:
        ``(new_params, new_state)``.
    """
    hp = resolve_hparams("sgd", hparams, SGD_DEFAULTS)
    return apply_per_parameter(_sgd_kernel, grads, state, params, hp)


sgd = FunctionalOptimizer(
    name="sgd", init=sgd_init, update=sgd_update, defaults=SGD_DEFAULTS, state_type=SGDState
)
"""Functional counterpart of :class:`torch.optim.SGD`."""
