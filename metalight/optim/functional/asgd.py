"""Functional ASGD (averaged stochastic gradient descent).

Mirrors :class:`torch.optim.ASGD` (single-tensor implementation). With gradient ``g``, parameter
``p``, step count ``t`` (incremented first), step size ``eta`` (initially ``lr``), averaging
coefficient ``mu`` (initially 1) and average ``ax``::

    g <- -g                                       (if maximize)
    g <- g + wd * p                               (if wd != 0)
    p <- p * (1 - lambd * eta) - eta * g          (uses the previous eta)
    ax <- ax + (p - ax) * mu   if mu != 1   else   ax <- p
    eta <- lr / (1 + lambd * lr * t) ** alpha
    mu <- 1 / max(1, t - t0)

``eta`` and ``mu`` are 0-d tensors (float64 for float64 parameters, float32 otherwise), so a
tensor ``lr``, ``lambd``, ``alpha`` or ``t0`` carries its gradient through them.

Example:
    >>> import torch
    >>> from metalight.optim.functional import asgd
    >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
    >>> state = asgd.init([w], lr=0.1)
    >>> (g,) = torch.autograd.grad((w**2).sum(), [w], create_graph=True)
    >>> (w1,), state = asgd.update([g], state, [w], lr=0.1, lambd=0.0)
    >>> w1.detach()
    tensor([ 0.8000, -1.6000])
    >>> state.ax[0].detach()
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
    apply_per_parameter,
    freeze_defaults,
    is_active,
    resolve_hparams,
    scalar_tensor,
)

__all__ = ["ASGDState", "asgd", "asgd_init", "asgd_update"]

ASGD_DEFAULTS = freeze_defaults(
    lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0, maximize=False
)


class ASGDState(NamedTuple):
    """State of :data:`asgd`; mirrors :class:`torch.optim.ASGD`'s state.

    Attributes:
        step: Number of steps taken per parameter (Python int).
        eta: Current step size (0-d tensor).
        mu: Current averaging coefficient (0-d tensor).
        ax: Running average of the parameter.
    """

    step: list[int | float]
    eta: list[Tensor]
    mu: list[Tensor]
    ax: list[Tensor]


def asgd_init(params: Sequence[Tensor], **hparams: Any) -> ASGDState:
    """Initial :class:`ASGDState`: ``eta = lr``, ``mu = 1``, ``ax = 0``.

    Args:
        params: The parameters.
        **hparams: Hyperparameters (``lr`` is used; a tensor ``lr`` keeps its autograd history).

    Returns:
        The initial state.
    """
    hp = resolve_hparams("asgd", hparams, ASGD_DEFAULTS)
    return ASGDState(
        step=[0 for _ in params],
        eta=[scalar_tensor(hp["lr"], p) for p in params],
        mu=[scalar_tensor(1.0, p) for p in params],
        ax=[torch.zeros_like(p) for p in params],
    )


def _mu_is_one(mu: Tensor | float) -> bool:
    if isinstance(mu, Tensor):
        if mu.requires_grad or mu.numel() != 1:
            return False
        return bool(mu.item() == 1)
    return mu == 1


def _asgd_kernel(
    param: Tensor, grad: Tensor, st: dict[str, Any], hp: Mapping[str, Any]
) -> tuple[Tensor, dict[str, Any]]:
    lr, lambd, alpha, t0 = hp["lr"], hp["lambd"], hp["alpha"], hp["t0"]
    if hp["maximize"]:
        grad = -grad
    eta, mu, ax = st["eta"], st["mu"], st["ax"]
    step = st["step"] + 1
    if is_active(hp["weight_decay"]):
        grad = add(grad, param, hp["weight_decay"])
    if isinstance(eta, Tensor) and not eta.requires_grad and eta.numel() == 1:
        eta = eta.item()  # like torch.optim: use the value as a Python scalar
    new_param = add(param * (1 - lambd * eta), grad, -eta)
    ax = new_param.clone() if _mu_is_one(mu) else ax + (new_param - ax) * mu
    new_eta = lr / ((1 + lambd * lr * step) ** alpha)
    if isinstance(t0, Tensor):
        new_mu: Tensor | float = 1 / torch.clamp(step - t0, min=1)
    else:
        new_mu = 1 / max(1, step - t0)
    return new_param, {
        "step": step,
        "eta": scalar_tensor(new_eta, param),
        "mu": scalar_tensor(new_mu, param),
        "ax": ax,
    }


def asgd_update(
    grads: Sequence[Tensor | None], state: ASGDState, params: Sequence[Tensor], **hparams: Any
) -> tuple[list[Tensor], ASGDState]:
    """One differentiable ASGD step (see the module docstring for the rule).

    Args:
        grads: One gradient per parameter; ``None`` leaves the parameter and its state unchanged.
        state: Current :class:`ASGDState`.
        params: The parameters.
        **hparams: ``lr``, ``lambd``, ``alpha``, ``t0``, ``weight_decay`` (numbers or tensors),
            ``maximize``.

    Returns:
        ``(new_params, new_state)``.
    """
    hp = resolve_hparams("asgd", hparams, ASGD_DEFAULTS)
    return apply_per_parameter(_asgd_kernel, grads, state, params, hp)


asgd = FunctionalOptimizer(
    name="asgd", init=asgd_init, update=asgd_update, defaults=ASGD_DEFAULTS, state_type=ASGDState
)
"""Functional counterpart of :class:`torch.optim.ASGD`."""
