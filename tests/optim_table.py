"""Shared table of torch.optim configurations for the optimizer tests.

Every case names a ``torch.optim`` class and the keyword arguments to build it with. The
learning rates keep 25+ steps on the test losses numerically well behaved. ``foreach=False`` is
included everywhere so the reference is torch's single-tensor implementation; functional
optimizers take the case's kwargs filtered to their ``defaults`` (see :func:`functional_hparams`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

__all__ = ["OPTIMIZER_CASES", "OptimCase", "functional_hparams"]


class OptimCase(NamedTuple):
    """One optimizer configuration: ``torch_cls(params, **kwargs)``."""

    id: str
    torch_cls: type[torch.optim.Optimizer]
    kwargs: dict[str, Any]


def functional_hparams(case: OptimCase, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The case's kwargs restricted to the hyperparameters a functional optimizer accepts."""
    return {k: v for k, v in case.kwargs.items() if k in defaults}


def _case(id: str, torch_cls: type[torch.optim.Optimizer], **kwargs: Any) -> OptimCase:
    return OptimCase(id, torch_cls, {**kwargs, "foreach": False})


OPTIMIZER_CASES: list[OptimCase] = [
    _case("sgd-plain", torch.optim.SGD, lr=0.1),
    _case("sgd-momentum", torch.optim.SGD, lr=0.05, momentum=0.9),
    _case("sgd-momentum-dampening", torch.optim.SGD, lr=0.05, momentum=0.9, dampening=0.3),
    _case("sgd-nesterov", torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True),
    _case("sgd-weight_decay", torch.optim.SGD, lr=0.1, momentum=0.5, weight_decay=0.1),
    _case("sgd-maximize", torch.optim.SGD, lr=0.05, momentum=0.5, maximize=True),
    _case("adam", torch.optim.Adam, lr=0.05),
    _case("adam-amsgrad", torch.optim.Adam, lr=0.05, betas=(0.8, 0.99), amsgrad=True),
    _case("adam-weight_decay", torch.optim.Adam, lr=0.05, weight_decay=0.1),
    _case("adam-maximize", torch.optim.Adam, lr=0.02, maximize=True),
    _case(
        "adam-decoupled_weight_decay",
        torch.optim.Adam,
        lr=0.05,
        weight_decay=0.1,
        decoupled_weight_decay=True,
    ),
    _case("adamw", torch.optim.AdamW, lr=0.05, weight_decay=0.1),
    _case("adamw-amsgrad", torch.optim.AdamW, lr=0.05, amsgrad=True),
    _case("adamw-maximize", torch.optim.AdamW, lr=0.02, maximize=True),
    _case("adadelta", torch.optim.Adadelta, lr=1.0),
    _case(
        "adadelta-weight_decay-maximize",
        torch.optim.Adadelta,
        lr=0.5,
        rho=0.8,
        eps=1e-5,
        weight_decay=0.1,
        maximize=True,
    ),
    _case("adagrad", torch.optim.Adagrad, lr=0.1),
    _case(
        "adagrad-lr_decay",
        torch.optim.Adagrad,
        lr=0.1,
        lr_decay=0.05,
        initial_accumulator_value=0.1,
        eps=1e-8,
    ),
    _case(
        "adagrad-weight_decay-maximize",
        torch.optim.Adagrad,
        lr=0.05,
        weight_decay=0.1,
        maximize=True,
    ),
    _case("adamax", torch.optim.Adamax, lr=0.05),
    _case("adamax-weight_decay", torch.optim.Adamax, lr=0.05, betas=(0.8, 0.9), weight_decay=0.1),
    _case("adamax-maximize", torch.optim.Adamax, lr=0.02, maximize=True),
    _case("asgd", torch.optim.ASGD, lr=0.05, lambd=1e-3, alpha=0.75, t0=5.0),
    _case("asgd-weight_decay-maximize", torch.optim.ASGD, lr=0.02, weight_decay=0.1, maximize=True),
    _case("rmsprop", torch.optim.RMSprop, lr=0.01),
    _case("rmsprop-centered", torch.optim.RMSprop, lr=0.01, alpha=0.9, centered=True),
    _case(
        "rmsprop-momentum-weight_decay",
        torch.optim.RMSprop,
        lr=0.01,
        momentum=0.5,
        weight_decay=0.1,
    ),
    _case("rmsprop-centered-momentum", torch.optim.RMSprop, lr=0.005, centered=True, momentum=0.9),
    _case("rmsprop-maximize", torch.optim.RMSprop, lr=0.005, maximize=True),
    _case("rprop", torch.optim.Rprop, lr=0.01),
    _case(
        "rprop-etas-step_sizes",
        torch.optim.Rprop,
        lr=0.02,
        etas=(0.3, 1.5),
        step_sizes=(1e-3, 0.05),
    ),
    _case("rprop-maximize", torch.optim.Rprop, lr=0.01, maximize=True),
    _case("radam", torch.optim.RAdam, lr=0.05),
    _case("radam-weight_decay", torch.optim.RAdam, lr=0.05, betas=(0.8, 0.99), weight_decay=0.1),
    _case(
        "radam-decoupled", torch.optim.RAdam, lr=0.05, weight_decay=0.1, decoupled_weight_decay=True
    ),
    _case("radam-maximize", torch.optim.RAdam, lr=0.02, maximize=True),
    _case("nadam", torch.optim.NAdam, lr=0.05),
    _case(
        "nadam-weight_decay-momentum_decay",
        torch.optim.NAdam,
        lr=0.05,
        weight_decay=0.1,
        momentum_decay=0.01,
    ),
    _case(
        "nadam-decoupled", torch.optim.NAdam, lr=0.05, weight_decay=0.1, decoupled_weight_decay=True
    ),
    _case("nadam-maximize", torch.optim.NAdam, lr=0.02, maximize=True),
]
"""Every functional optimizer with each meaningful option set."""
