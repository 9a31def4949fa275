"""Building the run's objects from a composed configuration, by ``_target_``."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import CheckpointIO
from omegaconf import DictConfig, OmegaConf

from metalight.bilevel.module import BilevelModule
from metalight.lightning.checkpoint_io import AtomicCheckpointIO
from metalight.lightning.module import MetaLearningModule
from metalight.run.errors import ConfigError
from metalight.run.selection import resolve_monitor
from metalight.run.tracking import log_config

__all__ = [
    "Components",
    "build",
    "build_callbacks",
    "build_datamodule",
    "build_loggers",
    "build_module",
    "build_trainer",
    "tensorboard_available",
]


def tensorboard_available() -> bool:
    """Whether Lightning's TensorBoard logger can run (``tensorboard`` or ``tensorboardX``).

    Example:
        >>> isinstance(tensorboard_available(), bool)
        True
    """
    return any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX"))


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The data module of ``cfg.data`` (nothing is loaded before ``setup``).

    Example:
        >>> from omegaconf import OmegaConf
        >>> cfg = OmegaConf.create({"data": {"_target_": "metalight.data.SinusoidDataModule"}})
        >>> type(build_datamodule(cfg)).__name__
        'SinusoidDataModule'
    """
    return instantiate(cfg.data, _convert_="all")


def build_module(cfg: DictConfig) -> MetaLearningModule | BilevelModule:
    """The algorithm of ``cfg.algorithm`` around the model of ``cfg.model``.

    The algorithm config refers to the optimizers (``inner_optim: ${inner_optim}``), which
    Hydra builds as ``functools.partial`` objects (``_partial_: true``).

    Example:
        >>> from omegaconf import OmegaConf
        >>> cfg = OmegaConf.create({
        ...     "model": {"_target_": "metalight.models.MLP"},
        ...     "algorithm": {"_target_": "metalight.algorithms.MAML", "inner_steps": 2}})
        >>> build_module(cfg).inner_steps
        2
    """
    model = instantiate(cfg.model, _convert_="all")
    module = instantiate(cfg.algorithm, model=model, _convert_="all")
    if not isinstance(module, MetaLearningModule | BilevelModule):
        raise TypeError(
            f"algorithm._target_ must build a metalight MetaLearningModule or BilevelModule, got "
            f"{type(module).__name__}"
        )
    if str(OmegaConf.select(cfg, "trainer.precision", default="") or "").startswith("64"):
        # Lightning restores a checkpoint's weights before its precision plugin converts the
        # module: built in float32, a float64 run's weights would be rounded on resume, eval
        # and metalight.load.
        module = module.double()
    return module


def _targets(node: DictConfig | None) -> list[tuple[str, DictConfig]]:
    if not node:
        return []
    return [(str(k), v) for k, v in node.items() if isinstance(v, DictConfig) and "_target_" in v]


# Trackers whose Lightning logger needs an optional package (the `trackers` extra).
_TRACKER_PACKAGES = {"WandbLogger": "wandb", "MLFlowLogger": "mlflow"}


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """The loggers of ``cfg.logger``; TensorBoard ones are skipped when it is not installed.

    Raises:
        ConfigError: for a W&B or MLflow logger whose package is not installed.

    Example:
        >>> from omegaconf import OmegaConf
        >>> build_loggers(OmegaConf.create({"logger": {}}))
        []
    """
    loggers = []
    for name, node in _targets(cfg.get("logger")):
        target = str(node["_target_"])
        if target.endswith("TensorBoardLogger") and not tensorboard_available():
            continue
        package = next((p for t, p in _TRACKER_PACKAGES.items() if target.endswith(t)), None)
        if package is not None and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"logger.{name} ({target.rsplit('.', 1)[-1]}) needs the {package} package: "
                f"pip install 'metalight[trackers]' (or {package}), or leave it out "
                "(logger=csv)"
            )
        kwargs: dict[str, Any] = {}
        uri = str(node.get("tracking_uri") or "")
        if target.endswith("MLFlowLogger") and uri.startswith("sqlite:///"):
            # Absolute, so that results.json names the store from anywhere; SQLite creates
            # the database file but not the folder it lives in.
            store = Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
            store.parent.mkdir(parents=True, exist_ok=True)
            kwargs["tracking_uri"] = f"sqlite:///{store}"
        loggers.append(instantiate(node, **kwargs, _convert_="all"))
    return loggers


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """The callbacks of ``cfg.callbacks`` (checkpointing, model selection, ...).

    ``monitor: auto`` and ``mode: auto`` become the post-adaptation validation accuracy
    (maximised) for classification data, the post-adaptation validation loss (minimised)
    for regression data (:func:`metalight.run.selection.resolve_monitor`).

    Example:
        >>> from omegaconf import OmegaConf
        >>> build_callbacks(OmegaConf.create({"callbacks": None}))
        []
    """
    callbacks = []
    for _, node in _targets(cfg.get("callbacks")):
        kwargs: dict[str, Any] = {}
        if node.get("monitor") == "auto" or node.get("mode") == "auto":
            monitor, mode = resolve_monitor(cfg, str(node.monitor), str(node.get("mode", "auto")))
            kwargs = {"monitor": monitor, "mode": mode}
        callbacks.append(instantiate(node, **kwargs, _convert_="all"))
    return callbacks


def build_trainer(
    cfg: DictConfig,
    loggers: list[Logger] | None = None,
    callbacks: list[Callback] | None = None,
    **overrides: Any,
) -> L.Trainer:
    """The ``lightning.Trainer`` of ``cfg.trainer`` with the given loggers and callbacks.

    Checkpointing is switched off when no ``ModelCheckpoint`` is among the callbacks, so a
    run without one writes no checkpoint anywhere. Checkpoints are saved through
    :class:`~metalight.lightning.checkpoint_io.AtomicCheckpointIO` unless ``trainer.plugins``
    names another ``CheckpointIO``; other plugins (e.g. ``SLURMEnvironment``) are kept.

    Example:
        >>> from omegaconf import OmegaConf
        >>> cfg = OmegaConf.create({"trainer": {"_target_": "lightning.Trainer",
        ...     "accelerator": "cpu", "inference_mode": False, "enable_progress_bar": False,
        ...     "enable_model_summary": False}})
        >>> build_trainer(cfg).checkpoint_callback is None
        True
    """
    callbacks = list(callbacks or [])
    kwargs: dict[str, Any] = {
        "logger": list(loggers) if loggers else False,
        "callbacks": callbacks,
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
    }
    plugins = [
        instantiate(node, _convert_="all") if isinstance(node, DictConfig) else node
        for node in (cfg.trainer.get("plugins") or [])
    ]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        # A kill during a save must leave the previous checkpoint whole.
        plugins.append(AtomicCheckpointIO())
    kwargs["plugins"] = plugins
    kwargs.update(overrides)
    return instantiate(cfg.trainer, **kwargs, _convert_="all")


@dataclass
class Components:
    """What one run is made of.

    Attributes:
        datamodule: the episodes.
        module: the algorithm with its model.
        trainer: the Lightning trainer, with loggers and callbacks.
    """

    datamodule: L.LightningDataModule
    module: MetaLearningModule | BilevelModule
    trainer: L.Trainer


def build(cfg: DictConfig) -> Components:
    """Instantiate the data module, the algorithm and the trainer of a composed config.

    ``cfg.paths.run_dir`` must be set, since loggers and checkpoints write under it. The
    loggers receive the composed config as hyperparameters.

    Example:
        >>> from hydra import compose, initialize_config_dir
        >>> from metalight.run import config_dir, register_recipes, register_resolvers
        >>> _ = register_recipes(); register_resolvers()
        >>> with initialize_config_dir(str(config_dir()), version_base="1.3"):
        ...     cfg = compose("train", ["+recipe=maml", "paths.run_dir=/tmp/x", "logger=none"])
        >>> type(build(cfg).module).__name__
        'MAML'
    """
    datamodule = build_datamodule(cfg)
    module = build_module(cfg)
    loggers = build_loggers(cfg)
    trainer = build_trainer(cfg, loggers, build_callbacks(cfg))
    # The trackers get the whole experiment, not only the module's arguments.
    log_config(trainer.loggers, cfg)
    return Components(datamodule, module, trainer)
