"""Validation and test of a ``MetaLearningModule``: adapt to each episode, record its metrics.

Each episode's query loss (and accuracy, for classification) is recorded before adaptation
(``pre``), after ``eval_inner_steps`` inner steps (``post``) and after each of
``eval_report_steps`` (``step<k>``) into the module's :class:`EpisodeMetrics`, which gives
the means with a 95% confidence interval over episodes at the end of the epoch.

Example:
    >>> import torch
    >>> from metalight.data.task import Task, TaskBatch
    >>> from metalight.lightning import MetaLearningModule
    >>> from metalight.lightning.evaluation import evaluate_batch
    >>> from metalight.models import MLP
    >>> _ = torch.manual_seed(0)
    >>> module = MetaLearningModule(MLP(), eval_inner_steps=2)
    >>> x = torch.linspace(-5, 5, 10).unsqueeze(-1)
    >>> task = Task(x, torch.sin(x), x, torch.sin(x), torch.zeros(2))
    >>> evaluate_batch(module, TaskBatch.stack([task]), "val", 0)
    >>> metrics = module._metrics.compute("val")
    >>> metrics["val/episodes"], metrics["val/loss_post"] < metrics["val/loss_pre"]
    (1.0, True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from metalight.data.task import Task, TaskBatch
from metalight.lightning.finite import NonFiniteError

if TYPE_CHECKING:
    from metalight.lightning.module import MetaLearningModule

__all__ = ["evaluate_batch", "evaluate_task", "log_episode_metrics"]


def evaluate_batch(
    module: MetaLearningModule, batch: TaskBatch, stage: str, batch_idx: int
) -> None:
    """Adapt to every episode of ``batch`` and record its metrics under ``stage``.

    A non-finite loss raises a :class:`NonFiniteError` naming the episode, or under
    ``nan_policy="skip"`` warns and counts the episode as diverged.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "MetaLearningModule adapts to each task in validation and test, which needs "
            "gradients: create the Trainer with inference_mode=False, e.g. "
            "lightning.Trainer(..., inference_mode=False)"
        )
    with torch.enable_grad():
        for index, task in enumerate(batch):
            try:
                evaluate_task(module, task, stage)
            except NonFiniteError as err:
                where = f"{stage} episode {index} of batch {batch_idx}"
                if module.nan_policy != "skip":
                    raise NonFiniteError(f"{where}: {err}") from err
                module._warn(f"skipping {where}: {err}")
                # Counted, never hidden: the logged means say how many were left out.
                module._metrics.record_diverged(
                    stage, classification=module.is_classification(task.query_y)
                )


def evaluate_task(module: MetaLearningModule, task: Task, stage: str) -> None:
    """Adapt to one episode and record its pre-, per-step and post-adaptation metrics."""
    classification = module.is_classification(task.query_y)
    values: dict[str, Tensor] = {}

    def record(name: str, output: Tensor) -> None:
        values[f"loss_{name}"] = module.outer_loss(output, task.query_y, task).detach()
        if classification:
            values[f"acc_{name}"] = (output.argmax(-1) == task.query_y).float().mean()

    with torch.no_grad():
        record("pre", module.model(task.query_x))

    def report(done: int, predict: Callable[[Tensor], Tensor]) -> None:
        if done in module.eval_report_steps:
            with torch.no_grad():
                record(f"step{done}", predict(task.query_x))

    if 0 in module.eval_report_steps:
        report(0, module.model)
    adaptation = module.adapt(task, module.eval_inner_steps, create_graph=False, on_step=report)
    with torch.no_grad():
        record("post", adaptation.predict(task.query_x))
    if module.nan_policy != "off":
        module._finite.expect_query_loss(values["loss_post"], module.eval_inner_steps)
    # An episode is recorded with all its metrics or, if any loss is NaN/Inf (possible
    # with nan_policy="off"), counted as diverged.
    module._metrics.record(stage, values, classification=classification)


def log_episode_metrics(module: MetaLearningModule, stage: str) -> None:
    """Log the epoch's ``stage`` metrics (means, 95% intervals, counts) and start afresh."""
    # Reduced over ranks by the metrics already; sync_dist only tells Lightning so.
    for key, value in module._metrics.compute(stage).items():
        headline = key.endswith("_post")
        module.log(key, value, prog_bar=headline, sync_dist=True)
    module._metrics.reset(stage)
