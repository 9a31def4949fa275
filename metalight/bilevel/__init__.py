"""Bilevel problems through unrolled training: gradients of anything about a training loop.

:class:`BilevelModule` trains a model for ``k`` differentiable steps per outer step (online:
the inner training continues from one outer step to the next) and learns meta-parameters of
that training from a validation loss. Built in: :class:`HyperLR` (per-layer learning rates and
weight decay with a schedule), :class:`Reweight` (per-example weights) and :class:`Distill`
(synthetic training data). :func:`~metalight.bilevel.unroll.unroll` is the engine.

Example:
    >>> import torch
    >>> from metalight.bilevel import HyperLR
    >>> module = HyperLR(torch.nn.Linear(64, 10), inner_steps=20, truncate=5)
    >>> [name for name, _ in module.named_meta_parameters()]
    ['log_lr', 'log_weight_decay']
"""

from metalight.bilevel.distill import Distill
from metalight.bilevel.hyper import HyperLR
from metalight.bilevel.module import (
    BilevelModule,
    InnerBatch,
    SplitSource,
    mean_ci95,
    pop_baseline,
)
from metalight.bilevel.reweight import Reweight
from metalight.bilevel.unroll import UnrollResult, unroll, update_per_parameter

__all__ = [
    "BilevelModule",
    "Distill",
    "HyperLR",
    "InnerBatch",
    "Reweight",
    "SplitSource",
    "UnrollResult",
    "mean_ci95",
    "pop_baseline",
    "unroll",
    "update_per_parameter",
]
