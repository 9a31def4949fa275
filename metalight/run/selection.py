"""Model selection by a validation metric (``callbacks=best``): keep the best checkpoint,
test its weights rather than the last ones, and stop early when validation stops improving.

:class:`BestCheckpoint` is a ``ModelCheckpoint`` that, when testing starts after training,
loads the weights of its best checkpoint into the module; :class:`ValidationEarlyStopping` is
Lightning's ``EarlyStopping``. Both stand aside in runs without validation (no validation
classes, or ``trainer.limit_val_batches=0``), which then test the last weights and say so.
:func:`describe_selection` is what ``results.json`` (``"selection"``) and the summary show.

A monitor of ``auto`` is post-adaptation validation accuracy (``val/acc_post``, higher is
better) for classification data and post-adaptation loss (``val/loss_post``, lower is better)
for regression data (see :func:`resolve_monitor`).

Example:
    >>> from omegaconf import OmegaConf
    >>> resolve_monitor(OmegaConf.create({"data": {"ways": 5}}), "auto", "auto")
    ('val/acc_post', 'max')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from metalight.run.errors import ConfigError

__all__ = [
    "BestCheckpoint",
    "ValidationEarlyStopping",
    "describe_selection",
    "objective",
    "resolve_monitor",
]

AUTO = "auto"


def resolve_monitor(cfg: DictConfig, monitor: str, mode: str) -> tuple[str, str]:
    """The metric and direction that ``monitor: auto`` / ``mode: auto`` stand for.

    Args:
        cfg: the composed run config (its ``data`` tells classification from regression).
        monitor: a logged metric (``val/acc_post``, ``val/loss_post``, ...) or ``auto``.
        mode: ``min``, ``max`` or ``auto`` (``max`` for accuracies, else ``min``).

    Example:
        >>> from omegaconf import OmegaConf
        >>> resolve_monitor(OmegaConf.create({"data": {"shots": 10}}), "auto", "auto")
        ('val/loss_post', 'min')
    """
    if monitor == AUTO:
        classification = OmegaConf.select(cfg, "data.ways", default=None) is not None
        monitor = "val/acc_post" if classification else "val/loss_post"
    if mode == AUTO:
        mode = "max" if "acc" in monitor.rsplit("/", 1)[-1] else "min"
    if mode not in ("min", "max"):
        raise ConfigError(f"the mode of monitor={monitor} must be min, max or auto, got {mode!r}")
    return monitor, mode


def _validates(trainer: L.Trainer) -> bool:
    # fast_dev_run is set by the Trainer's constructor but not declared in its stubs.
    return trainer.limit_val_batches != 0 and not getattr(trainer, "fast_dev_run", False)


class BestCheckpoint(ModelCheckpoint):
    """Keeps the checkpoint with the best validation metric and tests its weights.

    Arguments are those of ``ModelCheckpoint`` (give ``monitor`` and ``mode``). When
    ``trainer.test`` follows ``trainer.fit``, the module gets the weights of
    :attr:`best_model_path` first; without any validation it keeps the last weights.

    Attributes:
        best_step: the meta-iteration of the best checkpoint (``None`` before one).
        choice: what testing used, set when testing starts (see :func:`describe_selection`).

    Example:
        >>> import tempfile
        >>> callback = BestCheckpoint(dirpath=tempfile.mkdtemp(), monitor="val/loss_post")
        >>> callback.mode, callback.best_step
        ('min', None)
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.best_step: int | None = None
        self.choice: dict[str, Any] | None = None
        self._active = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = _validates(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if self._active:
            super().on_train_batch_end(trainer, *args, **kwargs)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active:
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        before = self.best_model_path
        super().on_validation_end(trainer, pl_module)
        if self.best_model_path and self.best_model_path != before:
            self.best_step = int(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["best_step"] = self.best_step
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.best_model_path == state_dict.get("best_model_path"):
            self.best_step = state_dict.get("best_step")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metric = {"metric": self.monitor, "mode": self.mode}
        path = self.best_model_path
        if not self._active or not path or not Path(path).is_file():
            reason = (
                "no validation in this run"
                if not self._active
                else "no validation ran before training ended"
            )
            self.choice = {"weights": "last", **metric, "reason": reason}
            return
        # The one weights loader (imported here: train -> build -> selection).
        from metalight.run.train import load_weights

        load_weights(pl_module, path, label=path)
        score = self.best_model_score
        self.choice = {
            "weights": "best",
            **metric,
            "score": None if score is None else float(score),
            "step": self.best_step,
            "checkpoint": path,
        }


class ValidationEarlyStopping(EarlyStopping):
    """Lightning's ``EarlyStopping``, standing aside in runs without validation.

    Attributes:
        stopped_step: the meta-iteration it stopped training at (``None``: it did not).

    Example:
        >>> ValidationEarlyStopping(monitor="val/acc_post", mode="max", patience=3).patience
        3
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stopped_step: int | None = None
        self._active = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = _validates(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active:
            super().on_train_epoch_end(trainer, pl_module)
            self._note_stop(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active:
            super().on_validation_end(trainer, pl_module)
            self._note_stop(trainer)

    def _note_stop(self, trainer: L.Trainer) -> None:
        if self.stopped_step is None and trainer.should_stop and self.wait_count >= self.patience:
            self.stopped_step = int(trainer.global_step)


def describe_selection(trainer: L.Trainer) -> dict[str, Any] | None:
    """Which weights the test of a run used, and why, for ``results.json`` and the summary.

    Returns:
        ``None`` without a :class:`BestCheckpoint`; else ``{"weights": "best" | "last",
        "metric", "mode", "score", "step", "checkpoint"}`` (or ``"reason"`` for the last
        weights), ``"early_stopped_at"`` when training stopped early, and ``"summary"``, one
        line of text.

    Example:
        >>> describe_selection(L.Trainer(logger=False, enable_checkpointing=False,
        ...     enable_progress_bar=False, enable_model_summary=False)) is None
        True
    """
    best = next((c for c in trainer.callbacks if isinstance(c, BestCheckpoint)), None)  # type: ignore[attr-defined]
    if best is None:
        return None
    choice = dict(
        best.choice
        or {"weights": "last", "metric": best.monitor, "mode": best.mode, "reason": "no test ran"}
    )
    stop = next(
        (c for c in trainer.callbacks if isinstance(c, ValidationEarlyStopping)),  # type: ignore[attr-defined]
        None,
    )
    if stop is not None and stop.stopped_step is not None:
        choice["early_stopped_at"] = stop.stopped_step
    if choice["weights"] == "best":
        text = (
            f"best {choice['metric']} ({choice['mode']}) {choice['score']:.4g} at meta-iteration "
            f"{choice['step']}: {choice['checkpoint']}"
        )
    else:
        text = f"last weights ({choice['reason']}; selection by {choice['metric']} needs it)"
    if "early_stopped_at" in choice:
        text += f"; stopped early at meta-iteration {choice['early_stopped_at']}"
    choice["summary"] = text
    return choice


def objective(cfg: DictConfig, results: dict[str, Any]) -> float | None:
    """The value a hyperparameter search optimises: ``cfg.optimized_metric`` of a run.

    A ``val/...`` metric is the best validation score of model selection (``callbacks=best``
    monitoring it); any other is a final metric of ``results["metrics"]``.

    Returns:
        ``None`` when ``cfg`` names no ``optimized_metric`` (not a search).

    Raises:
        ConfigError: if the run did not produce that metric.

    Example:
        >>> from omegaconf import OmegaConf
        >>> objective(OmegaConf.create({"optimized_metric": "test/loss_post"}),
        ...     {"metrics": {"test/loss_post": 0.5}})
        0.5
    """
    name = OmegaConf.select(cfg, "optimized_metric", default=None)
    if not name:
        return None
    selection = results.get("selection") or {}
    if selection.get("metric") == name and selection.get("score") is not None:
        return float(selection["score"])
    metrics = results.get("metrics") or {}
    if name in metrics:
        return float(metrics[name])
    known = sorted(metrics) + ([selection["metric"]] if selection.get("score") is not None else [])
    raise ConfigError(
        f"optimized_metric={name} was not produced by this run (it has: "
        f"{', '.join(known) or 'no metrics'}); validation metrics need callbacks=best "
        f"monitoring them (callbacks.best_checkpoint.monitor={name})"
    )
