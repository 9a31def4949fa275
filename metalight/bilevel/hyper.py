"""Learned per-layer learning rates and weight decay, with a schedule over the unroll."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from metalight.bilevel.module import BilevelModule, SplitSource

__all__ = ["HyperLR"]


class HyperLR(BilevelModule):
    """Hypergradient descent on the inner optimizer's learning rate and weight decay.

    Each layer (the weight tensors of one submodule of ``model``) has its own learning rate
    and weight decay, held as logarithms (so they stay positive) of shape
    ``[layers, schedule]``: inner step ``s`` of ``k`` uses column ``s * schedule // k``, a
    piecewise-constant schedule over the unroll. Both feed the inner optimizer as tensors, so
    any built-in optimizer works (SGD's and Adam's ``lr`` and ``weight_decay``).

    The baseline is the same training with a fixed learning rate chosen by grid search on the
    validation split: each rate of ``baseline_lrs`` trains a model from the same starting
    weights for as many inner steps as the method's current model had, on minibatches of the
    same size from the same training split.

    Args:
        model: the network trained in the inner loop.
        learn_lr: learn the learning rates.
        learn_weight_decay: learn the weight decay (else ``inner_optim``'s is used).
        schedule: pieces of the learning-rate schedule over one unroll (1: constant).
        init_weight_decay: the starting weight decay (> 0: it is learned in log space).
        baseline_lrs: the grid of fixed learning rates of the baseline.
        batch_size: the baseline's minibatch size (the data's inner batch size).
        **kwargs: :class:`~metalight.bilevel.BilevelModule` arguments.

    Example:
        >>> import torch
        >>> from metalight.bilevel import HyperLR
        >>> module = HyperLR(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)),
        ...                  schedule=2, inner_steps=4)
        >>> module.log_lr.shape, module.layer_of
        (torch.Size([2, 2]), [0, 0, 1, 1])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        learn_lr: bool = True,
        learn_weight_decay: bool = True,
        schedule: int = 1,
        init_weight_decay: float = 1e-4,
        baseline_lrs: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0),
        batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        if not isinstance(schedule, int) or not 1 <= schedule <= self.inner_steps:
            raise ValueError(
                f"schedule must be an integer in 1..inner_steps ({self.inner_steps}), got "
                f"{schedule!r}"
            )
        if not learn_lr and not learn_weight_decay:
            raise ValueError("HyperLR needs learn_lr or learn_weight_decay (or both) true")
        if learn_weight_decay and not init_weight_decay > 0:
            raise ValueError(
                f"init_weight_decay must be > 0 (it is learned as a logarithm), got "
                f"{init_weight_decay!r}"
            )
        if "lr" not in self.base_hparams or "weight_decay" not in self.base_hparams:
            raise TypeError(
                f"HyperLR learns lr and weight_decay, which {self.inner_opt.name} does not take"
            )
        layers: list[str] = []
        self.layer_of: list[int] = []
        for name in self.inner_names:
            layer = name.rpartition(".")[0]
            if layer not in layers:
                layers.append(layer)
            self.layer_of.append(layers.index(layer))
        self.layers = layers
        self.schedule = schedule
        self.baseline_lrs = [float(lr) for lr in baseline_lrs]
        self.batch_size = batch_size
        lr = float(self.base_hparams["lr"])
        self.log_lr = nn.Parameter(
            torch.full((len(layers), schedule), math.log(lr)), requires_grad=learn_lr
        )
        wd = init_weight_decay if learn_weight_decay else 1.0
        self.log_weight_decay = nn.Parameter(
            torch.full((len(layers), schedule), math.log(wd)), requires_grad=learn_weight_decay
        )
        self.learn_weight_decay = learn_weight_decay

    def inner_hparams(self, step: int) -> list[dict[str, Any]]:
        """Each weight's layer's learning rate (and weight decay) at this point of the unroll."""
        piece = step * self.schedule // self.inner_steps
        lrs = self.log_lr[:, piece].exp()
        decays = self.log_weight_decay[:, piece].exp() if self.learn_weight_decay else None
        out = []
        for layer in self.layer_of:
            hp = dict(self.base_hparams, lr=lrs[layer])
            if decays is not None:
                hp["weight_decay"] = decays[layer]
            out.append(hp)
        return out

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Logs the learned rates of the first piece of the schedule, per layer."""
        for i, layer in enumerate(self.layers):
            self.log(f"hyper/lr_{layer or 'root'}", self.log_lr[i, 0].exp().detach(), batch_size=1)
            if self.learn_weight_decay:
                decay = self.log_weight_decay[i, 0].exp().detach()
                self.log(f"hyper/wd_{layer or 'root'}", decay, batch_size=1)

    def evaluate_baseline(self, splits: SplitSource) -> dict[str, float] | None:
        """Grid-searched fixed learning rate, same start, steps, batch size and data."""
        steps = self.inner_age * self.inner_steps
        x, y = splits.split_tensors("train")
        val_x, val_y = splits.split_tensors("val")
        batches = self.minibatches(x, y, self.batch_size, self.seed)
        start = self.fresh_inner(None)
        best: tuple[float, float, list[Any]] | None = None
        for lr in self.baseline_lrs:
            hp = [dict(self.base_hparams, lr=lr)] * len(self.inner_names)
            params = self.fit_plain(start, batches, steps, hp)
            acc = self.score(params, val_x, val_y)["acc"]
            if best is None or acc > best[0]:
                best = (acc, lr, params)
        assert best is not None
        metrics = self.score(best[2], *splits.split_tensors("test"))
        return {**metrics, "lr": best[1], "val_acc": best[0], "inner_steps": float(steps)}
