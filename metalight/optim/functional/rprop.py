"""Functional Rprop (resilient backpropagation).

Mirrors :class:`torch.optim.Rprop` (single-tensor implementation). With gradient ``g``,
parameter ``p``, previous (masked) gradient ``prev``, per-entry step sizes ``s`` (initially
``lr``), ``etas = (eta_minus, eta_plus)`` and ``step_sizes = (s_min, s_max)``::

    g <- -g                                       (if maximize)
    f = eta_plus where g * prev > 0, eta_minus where g * prev < 0, 1 elsewhere
    s <- clamp(s * f, s_min, s_max)
    g <- 0 where g * prev < 0
    p <- p - sign(g) * s
    prev <- g

Only the step sizes carry a (meta-)gradient: ``sign`` is piecewise constant, so the parameters
depend on ``lr``, ``etas`` and ``step_sizes`` but the update direction has zero derivative.
Because ``lr`` only enters through the initial step sizes, pass a tensor ``lr`` to ``init``.

Example:
    >>> import torch
    >>> from metalight.optim.functional import rprop
    >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
    >>> state = rprop.init([w], lr=0.1)
    >>> (g,) = torch.autograd.grad((w**2).sum(), [w], create_graph=True)
    >>> (w1,), state = rprop.update([g], state, [w], lr=0.1)
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
    apply_per_parameter,
    filled_like,
    freeze_defaults,
    resolve_hparams,
)

__all__ = ["RpropState", "rprop", "rprop_init", "rprop_update"]

RPROP_DEFAULTS = freeze_defaults(lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50), maximize=False)


class RpropState(NamedTuple):
    """State of :data:`rprop`; mirrors :class:`torch.optim.Rprop`'s state.

    Attributes:
        step: Number of steps taken per parameter (Python int).
        prev: Previous gradients (zeroed where the sign flipped).
        step_size: Per-entry step sizes.
    """

    step: list[int | float]
    prev: list[Tensor]
    step_size: list[Tensor]


def rprop_init(params: Sequence[Tensor], **hparams: Any) -> RpropState:
    """Initial :class:`RpropState`: ``prev = 0`` and step sizes filled with ``lr``.

    Args:
        params: The parameters.
        **hparams: Hyperparameters (``lr`` is used; a tensor ``lr`` keeps its autograd history).

    Returns:
        The initial state.
    """
    hp = resolve_hparams("rprop", hparams, RPROP_DEFAULTS)
    return RpropState(
        step=[0 for _ in params],
        prev=[torch.zeros_like(p) for p in params],
        step_size=[filled_like(p, hp["lr"]) for p in params],
    )


def _clamp(x: Tensor, low: Any, high: Any) -> Tensor:
    if not isinstance(low, Tensor) and not isinstance(high, Tensor):
        return torch.clamp(x, low, high)
    low = torch.as_tensor(low, dtype=x.dtype, device=x.device)
    high = torch.as_tensor(high, dtype=x.dtype, device=x.device)
    return torch.minimum(torch.maximum(x, low), high)


def _rprop_kernel(
    param: Tensor, grad: Tensor, st: dict[str, Any], hp: Mapping[str, Any]
) -> tuple[Tensor, dict[str, Any]]:
    eta_minus, eta_plus = hp["etas"]
    step_size_min, step_size_max = hp["step_sizes"]
    if hp["maximize"]:
        grad = -grad
    step = st["step"] + 1
    sign = (grad * st["prev"]).sign()
    ones = torch.ones_like(grad)
    factor = torch.where(sign > 0, ones * eta_plus, torch.where(sign < 0, ones * eta_minus, ones))
    step_size = _clamp(st["step_size"] * factor, step_size_min, step_size_max)
    grad = torch.where(sign < 0, torch.zeros_like(grad), grad)
    new_param = param - grad.sign() * step_size
    return new_param, {"step": step, "prev": grad, "step_size": step_size}


def rprop_update(
    grads: Sequence[Tensor | None], state: RpropState, params: Sequence[Tensor], **hparams: Any
) -> tuple[list[Tensor], RpropState]:
    """One differentiable Rprop step (see the module docstring for the rule).

    Args:
        grads: One gradient per parameter; ``None`` leaves the parameter and its state unchanged.
        state: Current :class:`RpropState`.
        params: The parameters.
        **hparams: ``lr`` (only used by init), ``etas`` and ``step_sizes`` (pairs of numbers or
            tensors), ``maximize``.

    Returns:
        ``(new_params, new_state)``.
    """
    hp = resolve_hparams("rprop", hparams, RPROP_DEFAULTS)
    return apply_per_parameter(_rprop_kernel, grads, state, params, hp)


rprop = FunctionalOptimizer(
    name="rprop",
    init=rprop_init,
    update=rprop_update,
    defaults=RPROP_DEFAULTS,
    state_type=RpropState,
)
"""Functional counterpart of :class:`torch.optim.Rprop`."""
