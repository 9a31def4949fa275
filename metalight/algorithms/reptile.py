"""Reptile: move the initial weights towards the adapted ones."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metalight.data.task import Task, TaskBatch
from metalight.lightning.module import MetaLearningModule

__all__ = ["Reptile"]


class Reptile(MetaLearningModule):
    """Reptile (Nichol et al., 2018).

    Each task adapts with ``inner_steps`` ordinary (non-differentiated) steps; its
    meta-gradient is ``theta - phi``, the difference between the initial and the adapted
    weights. With an outer SGD of learning rate ``epsilon`` this is Reptile's update
    ``theta <- theta + epsilon * mean(phi - theta)``; any outer optimizer works. With
    ``vectorize_tasks="auto"`` a model without convolutions adapts all tasks of a
    meta-batch at once (the same weight differences, far fewer kernel launches).

    Args:
        model: the network.
        **kwargs: as for :class:`~metalight.lightning.MetaLearningModule`.

    Example:
        >>> import functools, torch
        >>> from metalight.algorithms import Reptile
        >>> from metalight.models import MLP
        >>> reptile = Reptile(MLP(), inner_steps=5,
        ...                   outer_optim=functools.partial(torch.optim.SGD, lr=0.1))
    """

    # The task-vectorised step (metalight.vectorized) adapts all tasks at once with plain
    # gradient steps and takes the same weight differences (vectorized_meta_gradient).
    vectorized_hooks = ("task_meta_gradient",)

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        if kwargs.get("learn_inner_lr") is not None:
            raise ValueError(
                "Reptile's meta-gradient does not reach inner learning rates; use MetaSGD or "
                "MAML with learn_inner_lr"
            )
        super().__init__(model, **kwargs)

    def task_meta_gradient(
        self, task: Task, meta_params: list[nn.Parameter], scale: float
    ) -> tuple[Tensor, list[Tensor | None]]:
        adaptation = self.adapt(task, self.inner_steps, create_graph=False)
        with torch.no_grad():
            output = adaptation.predict(task.query_x)
            loss = self.outer_loss(output, task.query_y, task)
            self.note_query_output(output, task)
            index = {id(p): i for i, p in enumerate(self.model.parameters())}
            grads: list[Tensor | None] = []
            for p in meta_params:
                i = index.get(id(p))
                grads.append(None if i is None else (p - adaptation.fast_params[i]) * scale)
        return loss, grads

    def vectorized_meta_gradient(
        self, batch: TaskBatch, meta_params: list[nn.Parameter]
    ) -> tuple[Tensor, list[Tensor | None]]:
        losses, fast, self._vectorized_accuracy = self.vectorized_adaptation(batch, graph=False)
        index = {id(p): i for i, p in enumerate(self.model.parameters())}
        grads: list[Tensor | None] = []
        with torch.no_grad():
            for p in meta_params:
                i = index.get(id(p))
                if i is None:
                    grads.append(None)
                elif fast[i].dim() > p.dim():  # adapted: one copy per task
                    grads.append((p - fast[i]).mean(0))
                else:  # not adapted: it stayed where it was
                    grads.append(torch.zeros_like(p))
        return losses, grads
