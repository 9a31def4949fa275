"""Differentiable optimizers: pure functional cores and higher-compatible stateful classes.

Three levels of the same algorithm:

- :mod:`metalight.optim.functional`: pure ``init``/``update`` functions (e.g.
  ``functional.adam``), no in-place operations, hyperparameters may be tensors.
- ``torch.optim.Adam``: the ordinary optimizer, from which a differentiable one is branched.
- :class:`DifferentiableAdam` (and one ``Differentiable<Name>`` per torch.optim algorithm):
  steps fast weights out of place, ``new_params = diffopt.step(loss)``.
"""

from collections import defaultdict
from typing import Any

from torch import Tensor

from metalight.optim import functional
from metalight.optim.builtin import (
    DifferentiableAdadelta,
    DifferentiableAdagrad,
    DifferentiableAdam,
    DifferentiableAdamax,
    DifferentiableAdamW,
    DifferentiableASGD,
    DifferentiableNAdam,
    DifferentiableRAdam,
    DifferentiableRMSprop,
    DifferentiableRprop,
    DifferentiableSGD,
)
from metalight.optim.differentiable import (
    DifferentiableOptimizer,
    FunctionalCoreOptimizer,
    GradCallback,
    Override,
)
from metalight.optim.registry import (
    apply_trainable_opt_params,
    create_diff_optim,
    differentiable_class,
    get_diff_optim,
    get_trainable_opt_params,
    register_optim,
    registered_optimizers,
)

# higher's type aliases, for code annotated with them (``higher.optim._OverrideType``).
_GroupedGradsType = list[list[Tensor | None]]
_StateType = list[defaultdict[int, Any]]
_OverrideType = Override
_GradCallbackType = GradCallback

__all__ = [
    "DifferentiableASGD",
    "DifferentiableAdadelta",
    "DifferentiableAdagrad",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdamax",
    "DifferentiableNAdam",
    "DifferentiableOptimizer",
    "DifferentiableRAdam",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "DifferentiableSGD",
    "FunctionalCoreOptimizer",
    "GradCallback",
    "Override",
    "apply_trainable_opt_params",
    "create_diff_optim",
    "differentiable_class",
    "functional",
    "get_diff_optim",
    "get_trainable_opt_params",
    "register_optim",
    "registered_optimizers",
]
