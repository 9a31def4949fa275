"""``train(cfg)`` and ``evaluate(cfg, ckpt_path)``: one run, from a composed config to a run
directory and its final metrics. The ``metalight`` command calls these; tests and notebooks
can too.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from metalight.data.datamodule import SinusoidDataModule
from metalight.lightning.checkpoint_io import atomic_write
from metalight.run.build import Components, build, build_datamodule, build_module, build_trainer
from metalight.run.errors import ConfigError
from metalight.run.plots import plot_sinusoid_tasks, plot_training_curves
from metalight.run.resources import make_run_dir
from metalight.run.summary import describe_data, format_summary
from metalight.run.validate import validate_config

__all__ = [
    "apply_overrides",
    "configure_torch",
    "evaluate",
    "load_run_config",
    "resolve_run_dir",
    "train",
]

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
CURVES_FILE = "training_curves.png"
TASKS_FILE = "sinusoid_tasks.png"


def configure_torch(cfg: DictConfig) -> None:
    """Apply ``num_threads`` (torch intra-op threads) and ``seed`` (every RNG) from ``cfg``.

    Example:
        >>> from omegaconf import OmegaConf
        >>> configure_torch(OmegaConf.create({"seed": 0, "num_threads": None}))
    """
    threads = cfg.get("num_threads")
    if threads:
        torch.set_num_threads(int(threads))
    seed = cfg.get("seed")
    if seed is not None:
        L.seed_everything(int(seed), workers=True, verbose=False)


def resolve_run_dir(cfg: DictConfig) -> Path:
    """This run's directory: ``paths.run_dir`` if set, else Hydra's output directory when run
    by Hydra, else a new directory under ``paths.output_dir``.

    Example:
        >>> import tempfile
        >>> from omegaconf import OmegaConf
        >>> parent = tempfile.mkdtemp()
        >>> cfg = OmegaConf.create({"paths": {"output_dir": parent, "run_dir": None}})
        >>> resolve_run_dir(cfg).parent == Path(parent)
        True
    """
    given = OmegaConf.select(cfg, "paths.run_dir", default=None)
    if given:
        path = Path(str(given))
        path.mkdir(parents=True, exist_ok=True)
        return path
    if HydraConfig.initialized():
        output_dir = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None)
        if output_dir:
            return Path(output_dir)
    return make_run_dir(OmegaConf.select(cfg, "paths.output_dir", default="runs"))


def _with_run_dir(cfg: DictConfig, run_dir: Path) -> DictConfig:
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        if cfg.get("paths") is None:
            cfg.paths = {}
        cfg.paths.run_dir = str(run_dir)
    return cfg


def _refuse_used(run_dir: Path) -> None:
    used = [n for n in (CONFIG_FILE, RESULTS_FILE, "checkpoints") if (run_dir / n).exists()]
    if used:
        raise ConfigError(
            f"run directory {run_dir} already holds a run ({', '.join(used)}); runs never "
            "overwrite each other: leave hydra.run.dir out (every run then gets a new "
            "directory) or give a new one"
        )


def _last_checkpoint(components: Components) -> str | None:
    for callback in components.trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, ModelCheckpoint):
            path = callback.last_model_path or callback.best_model_path
            if path:
                return path
    return None


def _csv_path(components: Components) -> Path | None:
    for logger in components.trainer.loggers:
        if type(logger).__name__ == "CSVLogger" and logger.log_dir:
            path = Path(logger.log_dir) / "metrics.csv"
            if path.is_file():
                return path
    return None


def _float_metrics(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for entry in results:
        for key, value in entry.items():
            merged[key] = float(value.item() if isinstance(value, torch.Tensor) else value)
    return merged


def _eval_steps(cfg: DictConfig) -> int | None:
    steps = OmegaConf.select(cfg, "algorithm.eval_inner_steps", default=None)
    if steps is None:
        steps = OmegaConf.select(cfg, "algorithm.inner_steps", default=None)
    return steps


def _base_results(cfg: DictConfig, command: str, run_dir: Path) -> dict[str, Any]:
    recipe = cfg.get("recipe") or {}
    return {
        "command": command,
        "recipe": recipe.get("name"),
        "description": recipe.get("description"),
        "paper": recipe.get("paper"),
        "expected": recipe.get("expected"),
        "data": describe_data(OmegaConf.to_container(cfg.data, resolve=True)),  # type: ignore[arg-type]
        "algorithm": str(cfg.algorithm.get("_target_", "")).rsplit(".", 1)[-1],
        "eval_inner_steps": _eval_steps(cfg),
        "run_dir": str(run_dir),
    }


def _write_pictures(
    components: Components, run_dir: Path, results: dict[str, Any], csv_path: Path | None
) -> None:
    files = results.setdefault("files", {})
    if csv_path is not None:
        files["metrics_csv"] = str(csv_path)
        title = f"{results.get('recipe') or 'no recipe'}: {results.get('data')}"
        files["training_curves"] = str(plot_training_curves(csv_path, run_dir / CURVES_FILE, title))
    if isinstance(components.datamodule, SinusoidDataModule):
        files["sinusoid_tasks"] = str(
            plot_sinusoid_tasks(components.module, components.datamodule, run_dir / TASKS_FILE)
        )


def _save(run_dir: Path, results: dict[str, Any]) -> None:
    atomic_write(run_dir / RESULTS_FILE, json.dumps(results, indent=2, default=str) + "\n")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Meta-train, test on the held-out tasks, and write the run directory.

    The run directory receives ``config.yaml`` (the composed config, resolved),
    ``checkpoints/`` (``last.ckpt``), ``logs/metrics.csv`` (and ``tensorboard/`` when
    installed), ``training_curves.png``, ``sinusoid_tasks.png`` for sinusoid data, and
    ``results.json``. ``ckpt_path`` resumes training from a checkpoint.

    Args:
        cfg: a composed ``train`` config (``configs/train.yaml`` with overrides).

    Returns:
        ``{"metrics": {test metric: value}, "run_dir": str, "checkpoint": str | None,
        "steps": int, "seconds": float, "recipe": ..., "files": {...}, ...}``.

    Raises:
        ConfigError: for a value that cannot work (checked before anything is built).

    Example:
        >>> from hydra import compose, initialize_config_dir
        >>> from metalight.run import config_dir, register_recipes, register_resolvers
        >>> _ = register_recipes(); register_resolvers()
        >>> with initialize_config_dir(str(config_dir()), version_base="1.3"):
        ...     cfg = compose("train", ["+recipe=maml", "trainer.max_steps=2"])
        >>> results = train(cfg)  # doctest: +SKIP
        >>> results["metrics"]["test/loss_post"]  # doctest: +SKIP
        0.93
    """
    validate_config(cfg)
    configure_torch(cfg)
    run_dir = resolve_run_dir(cfg)
    if rank_zero_only.rank == 0:
        _refuse_used(run_dir)
    cfg = _with_run_dir(cfg, run_dir)
    components = build(cfg)
    if rank_zero_only.rank == 0:
        atomic_write(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    trainer = components.trainer
    ckpt_path = cfg.get("ckpt_path")
    start = time.monotonic()
    trainer.fit(components.module, datamodule=components.datamodule, ckpt_path=ckpt_path)
    seconds = time.monotonic() - start
    test = trainer.test(components.module, datamodule=components.datamodule, verbose=False)
    results = _base_results(cfg, "train", run_dir)
    results.update(
        metrics=_float_metrics(test),
        steps=int(trainer.global_step),
        seconds=seconds,
        checkpoint=_last_checkpoint(components),
        resumed_from=ckpt_path,
    )
    if trainer.is_global_zero:
        _write_pictures(components, run_dir, results, _csv_path(components))
        results["files"]["config"] = str(run_dir / CONFIG_FILE)
        _save(run_dir, results)
        print(format_summary(results), flush=True)
    return results


def load_run_config(ckpt_path: str | os.PathLike[str]) -> tuple[DictConfig, Path]:
    """The config saved by ``metalight train`` in the run directory of a checkpoint.

    Looks for ``config.yaml`` beside the checkpoint and one folder up (checkpoints live in
    ``<run dir>/checkpoints/``).

    Returns:
        The config (struct mode, so misspelt keys in overrides are refused) and the run
        directory.

    Raises:
        ConfigError: if the checkpoint or the config does not exist.

    Example:
        >>> load_run_config("no/such.ckpt")
        Traceback (most recent call last):
        ...
        metalight.run.errors.ConfigError: ckpt_path=no/such.ckpt does not exist...
    """
    ckpt = Path(ckpt_path).expanduser()
    if not ckpt.is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path} does not exist (looked for {ckpt.resolve()}); give the "
            "path of a .ckpt file, e.g. runs/RUN/checkpoints/last.ckpt"
        )
    candidates = [ckpt.parent / CONFIG_FILE, ckpt.parent.parent / CONFIG_FILE]
    for candidate in candidates:
        if candidate.is_file():
            cfg = OmegaConf.load(candidate)
            if not isinstance(cfg, DictConfig):
                raise ConfigError(f"{candidate} does not hold a metalight config")
            OmegaConf.set_struct(cfg, True)
            return cfg, candidate.parent
    raise ConfigError(
        f"no {CONFIG_FILE} next to {ckpt} (looked for {' and '.join(map(str, candidates))}): "
        "eval rebuilds the model from the config that `metalight train` saves in the run "
        "directory; keep the checkpoint inside its run directory"
    )


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Apply Hydra-syntax value overrides (``a.b=1``, ``+a.c=2``, ``~a.d``) to a saved config.

    Whole config groups (``data=omniglot``) cannot be swapped in a saved config.

    Example:
        >>> from omegaconf import OmegaConf
        >>> cfg = OmegaConf.create({"data": {"test_episodes": 600}})
        >>> apply_overrides(cfg, ["data.test_episodes=100"]).data.test_episodes
        100
    """
    cfg = copy.deepcopy(cfg)
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if override.is_sweep_override():
            raise ConfigError(f"{override.input_line}: eval takes one value per key, not a sweep")
        if override.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if not isinstance(node, DictConfig) or leaf not in node:
                raise ConfigError(f"{override.input_line}: there is no {key} to delete")
            with open_dict(node):
                del node[leaf]
            continue
        current = OmegaConf.select(cfg, key, default=None)
        if isinstance(current, DictConfig) and not isinstance(override.value(), dict):
            raise ConfigError(
                f"{override.input_line}: eval reuses the run's saved config and cannot swap a "
                f"whole group; change single values instead, e.g. {key}.KEY=VALUE"
            )
        try:
            OmegaConf.update(
                cfg,
                key,
                override.value(),
                merge=True,
                force_add=override.is_add() or override.is_force_add(),
            )
        except Exception as err:
            raise ConfigError(
                f"{override.input_line}: {key} is not in the saved config (add it with "
                f"+{override.input_line.lstrip('+')}): {err}"
            ) from None
    return cfg


def _load_weights(module: L.LightningModule, ckpt_path: str | os.PathLike[str]) -> None:
    # Only the weights: restoring the whole training state through trainer.test(ckpt_path=)
    # would also ask for the training callbacks, which an evaluation does not use.
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"ckpt_path={ckpt_path} is not a readable checkpoint: {err}") from None
    if "state_dict" not in checkpoint:
        raise ConfigError(f"ckpt_path={ckpt_path} holds no state_dict: not a Lightning checkpoint")
    module.on_load_checkpoint(checkpoint)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise ConfigError(
            f"the weights in {ckpt_path} do not fit the model of its run's config.yaml: {err}"
        ) from None


def evaluate(cfg: DictConfig, ckpt_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Test a checkpoint on the test episodes, with the model rebuilt from ``cfg``.

    Results (``results.json``, ``config.yaml`` and for sinusoid data the task picture) go to
    a new directory ``<run dir>/eval/<time>``.

    Args:
        cfg: the run's saved config (see :func:`load_run_config`), possibly with overrides.
        ckpt_path: the checkpoint whose weights are tested.

    Returns:
        As :func:`train`, with ``checkpoint_evaluated`` and no training fields.

    Example:
        >>> cfg, run_dir = load_run_config("runs/RUN/checkpoints/last.ckpt")  # doctest: +SKIP
        >>> evaluate(cfg, "runs/RUN/checkpoints/last.ckpt")["metrics"]  # doctest: +SKIP
    """
    checked = copy.deepcopy(cfg)
    with open_dict(checked):
        checked.ckpt_path = str(ckpt_path)
    validate_config(checked)
    configure_torch(cfg)
    run_dir = Path(str(OmegaConf.select(cfg, "paths.run_dir", default="") or "."))
    datamodule = build_datamodule(cfg)
    module = build_module(cfg)
    _load_weights(module, ckpt_path)
    trainer = build_trainer(cfg, loggers=[], callbacks=[])
    test = trainer.test(module, datamodule=datamodule, verbose=False)
    if not trainer.is_global_zero:
        return {"metrics": _float_metrics(test)}
    out_dir = make_run_dir(run_dir / "eval")
    results = _base_results(cfg, "eval", out_dir)
    results.update(metrics=_float_metrics(test), checkpoint_evaluated=str(ckpt_path))
    components = Components(datamodule, module, trainer)
    _write_pictures(components, out_dir, results, None)
    atomic_write(out_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    results["files"]["config"] = str(out_dir / CONFIG_FILE)
    _save(out_dir, results)
    print(format_summary(results), flush=True)
    return results
