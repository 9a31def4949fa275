"""Pure, differentiable counterparts of ``torch.optim`` optimizers.

Each optimizer is a :class:`FunctionalOptimizer` with ``init(params, **hparams) -> state`` and
``update(grads, state, params, **hparams) -> (new_params, new_state)``. ``update`` never modifies
its inputs in place, so the new parameters are differentiable (to any order) with respect to the
old parameters, the gradients and any hyperparameter given as a tensor; this is the engine of
gradient-based meta-learning. The numerics mirror ``torch.optim``'s single-tensor
(``foreach=False``) implementations.

Example:
    >>> import torch
    >>> from metalight.optim.functional import BY_TORCH_CLASS
    >>> opt = BY_TORCH_CLASS[torch.optim.Adam]
    >>> w = torch.zeros(3, requires_grad=True)
    >>> lr = torch.tensor(0.1, requires_grad=True)
    >>> state = opt.init([w], lr=lr)
    >>> params = [w]
    >>> for _ in range(3):
    ...     loss = ((params[0] - 1.0) ** 2).sum()
    ...     grads = torch.autograd.grad(loss, params, create_graph=True)
    ...     params, state = opt.update(grads, state, params, lr=lr)
    >>> meta_loss = ((params[0] - 1.0) ** 2).sum()
    >>> d_lr = torch.autograd.grad(meta_loss, lr)[0]
    >>> bool(d_lr < 0)  # a larger learning rate would help
    True
"""

from __future__ import annotations

import torch

from metalight.optim.functional.adadelta import AdadeltaState, adadelta
from metalight.optim.functional.adagrad import AdagradState, adagrad
from metalight.optim.functional.adam import AdamState, adam, adamw
from metalight.optim.functional.adamax import AdamaxState, adamax
from metalight.optim.functional.asgd import ASGDState, asgd
from metalight.optim.functional.core import (
    FunctionalOptimizer,
    InitFn,
    UpdateFn,
    resolve_hparams,
    safe_sqrt,
    state_from_torch,
    state_to_dicts,
)
from metalight.optim.functional.nadam import NAdamState, nadam
from metalight.optim.functional.radam import RAdamState, radam
from metalight.optim.functional.rmsprop import RMSpropState, rmsprop
from metalight.optim.functional.rprop import RpropState, rprop
from metalight.optim.functional.sgd import SGDState, sgd

__all__ = [
    "BY_TORCH_CLASS",
    "ASGDState",
    "AdadeltaState",
    "AdagradState",
    "AdamState",
    "AdamaxState",
    "FunctionalOptimizer",
    "InitFn",
    "NAdamState",
    "RAdamState",
    "RMSpropState",
    "RpropState",
    "SGDState",
    "UpdateFn",
    "adadelta",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "asgd",
    "nadam",
    "radam",
    "resolve_hparams",
    "rmsprop",
    "rprop",
    "safe_sqrt",
    "sgd",
    "state_from_torch",
    "state_to_dicts",
]

BY_TORCH_CLASS: dict[type[torch.optim.Optimizer], FunctionalOptimizer] = {
    torch.optim.SGD: sgd,
    torch.optim.Adam: adam,
    torch.optim.AdamW: adamw,
    torch.optim.Adadelta: adadelta,
    torch.optim.Adagrad: adagrad,
    torch.optim.Adamax: adamax,
    torch.optim.ASGD: asgd,
    torch.optim.RMSprop: rmsprop,
    torch.optim.Rprop: rprop,
    torch.optim.RAdam: radam,
    torch.optim.NAdam: nadam,
}
"""Functional optimizer for each supported ``torch.optim`` class (exact class, no subclasses)."""
