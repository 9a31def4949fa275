"""Experiment trackers: ``logger=csv|tensorboard|wandb|mlflow`` or several, ``logger=[csv,wandb]``.

Every tracker receives the composed config as its hyperparameters when the run is built
(:func:`log_config`) and, through Lightning, the curves and the final test metrics with their
95% confidence intervals. At the end of a run :func:`finish_trackers` closes them (a
Weights & Biases run is only complete on disk once finished) and says where each wrote; the
run's ``results.json`` keeps that under ``"trackers"``.

All of them work offline: W&B in offline mode writes a run folder that ``wandb sync`` uploads
later, MLflow writes to a local SQLite store.

Example:
    >>> from lightning.pytorch.loggers import CSVLogger
    >>> import tempfile
    >>> logger = CSVLogger(tempfile.mkdtemp(), name="logs", version="")
    >>> sorted(tracker_locations([logger])["csv"])
    ['metrics', 'summary']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

__all__ = ["config_params", "finish_trackers", "log_config", "tracker_locations"]


def _kind(logger: Logger) -> str:
    name = type(logger).__name__
    return {
        "CSVLogger": "csv",
        "TensorBoardLogger": "tensorboard",
        "WandbLogger": "wandb",
        "MLFlowLogger": "mlflow",
    }.get(name, name)


def config_params(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as a nested dict of plain values (what trackers receive).

    The ``hydra`` node, if any, is left out: it describes the launcher, not the experiment.

    Example:
        >>> from omegaconf import OmegaConf
        >>> config_params(OmegaConf.create({"seed": 0, "a": {"b": "${seed}"}}))
        {'seed': 0, 'a': {'b': 0}}
    """
    params = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(params, dict)
    params.pop("hydra", None)
    return {str(k): v for k, v in params.items()}


def log_config(loggers: Sequence[Logger], cfg: DictConfig) -> None:
    """Log the composed config as hyperparameters to every tracker.

    Lightning flattens nested keys for the trackers that need it (MLflow: ``model/hidden``),
    W&B keeps the nesting, TensorBoard records it in its HParams tab (and ``hparams.yaml``).

    Example:
        >>> from omegaconf import OmegaConf
        >>> log_config([], OmegaConf.create({"seed": 0}))
    """
    if not loggers:
        return
    params = config_params(cfg)
    for logger in loggers:
        logger.log_hyperparams(params)


def tracker_locations(loggers: Sequence[Logger]) -> dict[str, dict[str, str]]:
    """Where each tracker of a run wrote, by kind (``csv``, ``tensorboard``, ``wandb``,
    ``mlflow``), with the command that opens or uploads it.

    Example:
        >>> tracker_locations([])
        {}
    """
    places: dict[str, dict[str, str]] = {}
    for logger in loggers:
        kind = _kind(logger)
        where: dict[str, str] = {}
        if kind == "csv" and logger.log_dir:
            where["metrics"] = str(Path(logger.log_dir) / "metrics.csv")
        elif kind == "tensorboard" and logger.log_dir:
            where["dir"] = str(logger.log_dir)
            where["open"] = f"tensorboard --logdir {logger.log_dir}"
        elif kind == "wandb":
            run = getattr(logger, "_experiment", None)
            if run is not None and getattr(run, "dir", None):
                # run.dir is the run's files/ folder; `wandb sync` takes the folder above.
                run_folder = Path(run.dir).parent
                where["dir"] = str(run_folder)
                where["run_id"] = str(run.id)
                if getattr(run.settings, "mode", "") == "offline" or run.offline:
                    where["sync"] = f"wandb sync {run_folder}"
        elif kind == "mlflow":
            uri = str(getattr(logger, "_tracking_uri", "") or "")
            where["tracking_uri"] = uri
            # MLFlowLogger's: the run's ids (read by name: kind is known, the type is not).
            where["experiment_id"] = str(getattr(logger, "experiment_id", "") or "")
            where["run_id"] = str(getattr(logger, "run_id", "") or "")
            where["open"] = f"mlflow ui --backend-store-uri {uri}"
        if where:
            # One line for the end-of-run summary.
            shown = where.get("dir") or where.get("metrics") or where.get("tracking_uri", "")
            if kind == "mlflow":
                shown += f" (run {where['run_id']})"
            if "sync" in where:
                shown += f" (offline; upload with: {where['sync']})"
            where["summary"] = shown
            places[kind] = where
    return places


def finish_trackers(
    loggers: Sequence[Logger], cfg: DictConfig, metrics: Mapping[str, float]
) -> dict[str, dict[str, str]]:
    """Close the trackers of a finished run and say where each wrote.

    TensorBoard's HParams tab gets the config with the final metrics (it shows hyperparameters
    only together with metrics). Lightning finalizes the loggers after testing, but a W&B run
    stays open (and its offline files incomplete) until it is finished; a second run in the
    same process would otherwise continue the first one.

    Args:
        loggers: the run's loggers.
        cfg: the composed config.
        metrics: the final test metrics.

    Returns:
        :func:`tracker_locations` of ``loggers``.

    Example:
        >>> from omegaconf import OmegaConf
        >>> finish_trackers([], OmegaConf.create({}), {})
        {}
    """
    places = tracker_locations(loggers)
    for logger in loggers:
        kind = _kind(logger)
        if kind == "tensorboard" and metrics:
            logger.log_hyperparams(config_params(cfg), metrics=dict(metrics))
            logger.finalize("success")
        elif kind == "wandb" and (run := getattr(logger, "_experiment", None)) is not None:
            run.finish()
    return places
