"""``train(cfg)`` and ``evaluate(cfg, ckpt_path)``: one run, from a composed config to a run
directory and its final metrics. The ``metalight`` command calls these; tests and notebooks
can too.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, cast

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from metalight.bilevel.module import BilevelModule, pop_baseline
from metalight.data.datamodule import SinusoidDataModule
from metalight.lightning import MetaLearningModule
from metalight.lightning.checkpoint_io import (
    CorruptCheckpointError,
    DiskFullError,
    as_disk_full,
    atomic_write,
    load_checkpoint_file,
)
from metalight.run.build import Components, build, build_datamodule, build_module, build_trainer
from metalight.run.errors import ConfigError
from metalight.run.held_out import skip_absent_splits
from metalight.run.plots import plot_sinusoid_tasks, plot_training_curves
from metalight.run.resources import created_here, make_run_dir, note_created
from metalight.run.selection import describe_selection
from metalight.run.summary import describe_data, format_summary
from metalight.run.tracking import finish_trackers
from metalight.run.validate import validate_config

__all__ = [
    "RunInterrupted",
    "apply_overrides",
    "configure_torch",
    "evaluate",
    "load_run_config",
    "refuse_used_run_dir",
    "resolve_run_dir",
    "train",
]

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
CURVES_FILE = "training_curves.png"
TASKS_FILE = "sinusoid_tasks.png"
# What a checkpoint restores besides the weights' values: a resume must not change these.
_RESTORED = ("model", "outer_optim", "scheduler")
_RESTORED_ALGORITHM = ("_target_", "learn_inner_lr", "inner_lr")
_CONFIG_STATE_KEY = "metalight.run_config"
# The test suite's hook: "STEP" or "STEP:SIGINT" sends this process the signal while it trains
# meta-iteration STEP (0: as training starts), as a scheduler or a user would.
SIGNAL_AT_STEP_ENV = "METALIGHT_TEST_SIGNAL_AT_STEP"
_EXIT_CODES: dict[int, int] = {int(signal.SIGTERM): 143, int(signal.SIGINT): 130}


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


def _hydra_node() -> DictConfig:
    # HydraConfig.get() is typed as Hydra's dataclass but is the DictConfig; selecting from
    # it tolerates what a composed (not run) config leaves missing (runtime.output_dir).
    return cast(DictConfig, HydraConfig.get())


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
        if not path.exists():
            path.mkdir(parents=True, exist_ok=True)
            note_created(path)
        return path
    if HydraConfig.initialized():
        output_dir = OmegaConf.select(_hydra_node(), "runtime.output_dir", default=None)
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


def refuse_used_run_dir(run_dir: Path, hydra_files: bool = True) -> None:
    """Refuses a run directory that already holds a run (runs never overwrite each other).

    Args:
        run_dir: the directory a run is about to use.
        hydra_files: whether Hydra's ``.hydra/`` counts (not once Hydra wrote this run's).

    Raises:
        ConfigError: if ``run_dir`` holds a config, results, checkpoints or Hydra's files.

    Example:
        >>> import tempfile
        >>> refuse_used_run_dir(Path(tempfile.mkdtemp()))
    """
    names = (CONFIG_FILE, RESULTS_FILE, "checkpoints") + ((".hydra",) if hydra_files else ())
    used = [n for n in names if (run_dir / n).exists()]
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


def _float_metrics(results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
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


def _tested_steps(module: L.LightningModule) -> int:
    """The inner steps behind a bilevel module's test metrics: the inner training since its
    last restart (online runs carry it over every outer step), ``inner_steps`` per step."""
    assert isinstance(module, BilevelModule)
    return max(int(module.inner_age), 1) * int(module.inner_steps)


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


def _warn(text: str) -> None:
    print(f"metalight: warning: {text}", file=sys.stderr, flush=True)


def _write_pictures(
    components: Components, run_dir: Path, results: dict[str, Any], csv_path: Path | None
) -> bool:
    """Draws the run's pictures, best effort: a picture that fails costs a one-line warning,
    never the run's results. Returns whether any file was added to ``results["files"]``."""
    files = results.setdefault("files", {})
    drawn = False
    jobs: list[tuple[str, Path, Any]] = []
    if csv_path is not None:
        files["metrics_csv"] = str(csv_path)
        title = f"{results.get('recipe') or 'no recipe'}: {results.get('data')}"
        jobs.append(
            (
                "training_curves",
                run_dir / CURVES_FILE,
                lambda out: plot_training_curves(csv_path, out, title),
            )
        )
    module, datamodule = components.module, components.datamodule
    if isinstance(datamodule, SinusoidDataModule) and isinstance(module, MetaLearningModule):
        jobs.append(
            (
                "sinusoid_tasks",
                run_dir / TASKS_FILE,
                lambda out: plot_sinusoid_tasks(module, datamodule, out),
            )
        )
    for key, out, draw in jobs:
        try:
            files[key] = str(draw(out))
            drawn = True
        except Exception as err:  # a picture is never worth the run
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            _warn(f"could not draw {out} ({type(err).__name__}: {reason}); the results are kept")
    return drawn


def _save(run_dir: Path, results: dict[str, Any]) -> None:
    atomic_write(run_dir / RESULTS_FILE, json.dumps(results, indent=2, default=str) + "\n")


class RunInterrupted(Exception):
    """``SIGTERM`` or ``SIGINT`` (or, with ``trainer=slurm``, the requeue signal ``SIGUSR1``)
    stopped a run; the step in progress is saved to resume from.

    Attributes:
        signum: the signal.
        exit_code: the conventional status of a process stopped by it (143, 130; 128 + the
            signal's number for others).
        step: the meta-iterations done in total when it stopped.
        checkpoint: the checkpoint that resumes the run (``None``: start again).
        phase: what the run was doing (``"training"``, ``"testing"``, ...).
    """

    def __init__(self, signum: int, step: int, checkpoint: str | None, phase: str) -> None:
        self.signum = signum
        self.exit_code = _EXIT_CODES.get(signum, 128 + int(signum))
        self.step = step
        self.checkpoint = checkpoint
        self.phase = phase
        super().__init__(f"{signal.Signals(signum).name} during {phase}, at meta-iteration {step}")


class _Interrupts:
    """SIGTERM/SIGINT handlers that ask the run to stop at the next safe point.

    A signal only sets a flag; the run saves the step it is in when that step ends (see
    :class:`_InterruptCallback`). A second SIGINT (Ctrl-C twice) stops at once, as usual.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: dict[int, Any] = {}

    def install(self, signums: Sequence[int] = tuple(_EXIT_CODES)) -> _Interrupts:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in signums:
            self._saved.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handle)
        return self

    def take_over(self) -> None:
        """Puts the handlers back in place (Lightning installs its own SIGTERM handler)."""
        if self._saved and threading.current_thread() is threading.main_thread():
            for signum in self._saved:
                signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        again = (
            " (Ctrl-C again stops at once, losing the steps since the last checkpoint)"
            if signum == signal.SIGINT
            else ""
        )
        # os.write, not print: the handler may run inside a print of the main program.
        os.write(
            2,
            f"metalight: {name} received: saving the current step, then stopping{again}\n".encode(),
        )


class _InterruptCallback(Callback):
    """Saves the step in progress and stops the run when a signal came (rank 0's decides)."""

    def __init__(self, interrupts: _Interrupts, checkpoint: Path) -> None:
        self.interrupts = interrupts
        self.checkpoint = checkpoint
        self.resumed_from: str | None = None
        self._saved: RunInterrupted | None = None
        self.steps_done = 0  # in this process
        self.signal_at: tuple[int, int] | None = None
        hook = os.environ.get(SIGNAL_AT_STEP_ENV)
        if hook:
            step, _, name = hook.partition(":")
            self.signal_at = (int(step), int(getattr(signal, name or "SIGTERM")))

    def _asked(self, trainer: L.Trainer) -> int | None:
        signum = self.interrupts.signum
        if trainer.world_size > 1:
            # Every rank must take the same path, or the save's barrier would hang.
            code = trainer.strategy.broadcast(signum or 0, src=0)
            signum = int(code) or None
        return signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.interrupts.take_over()
        if self.signal_at is not None and self.signal_at[0] == 0:
            os.kill(os.getpid(), self.signal_at[1])
        signum = self._asked(trainer)
        if signum is not None:
            raise RunInterrupted(signum, trainer.global_step, self.resumed_from, "start-up")

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._stop_if_saved()
        if self.signal_at is not None and self.signal_at[0] == trainer.global_step + 1:
            os.kill(os.getpid(), self.signal_at[1])

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.steps_done += 1
        # Here, at the end of a step, is where the periodic checkpoints are saved too: a
        # resume from this one continues exactly as the uninterrupted run would have.
        signum = self._asked(trainer)
        if signum is None:
            return
        trainer.save_checkpoint(self.checkpoint)
        # Stopped at the next hook, once Lightning has logged this step's metrics.
        self._saved = RunInterrupted(signum, trainer.global_step, str(self.checkpoint), "training")

    def _stop_if_saved(self) -> None:
        if self._saved is not None:
            raise self._saved

    # The hooks that may come next: the next step, the epoch's end or validation, the end.
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_saved()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_saved()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_saved()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.interrupts.take_over()

    def on_test_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        signum = self._asked(trainer)
        if signum is not None:
            raise RunInterrupted(signum, trainer.global_step, self.resumed_from, "testing")


class _RunConfigRecord(Callback):
    """Keeps in every checkpoint the settings it restores, so a resume can compare them."""

    def __init__(self, cfg: DictConfig) -> None:
        self.text = OmegaConf.to_yaml(_restored_settings(cfg))

    @property
    def state_key(self) -> str:
        return _CONFIG_STATE_KEY

    def state_dict(self) -> dict[str, Any]:
        return {"restored": self.text}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # read before the run is built, by _check_resume


def _restored_settings(cfg: DictConfig) -> DictConfig:
    picked: dict[str, Any] = {}
    for key in _RESTORED:
        node = OmegaConf.select(cfg, key, default=None)
        picked[key] = (
            OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        )
    algorithm: dict[str, Any] = {}
    for key in _RESTORED_ALGORITHM:
        value = OmegaConf.select(cfg, f"algorithm.{key}", default=None)
        if value is not None:
            algorithm[key] = value
    picked["algorithm"] = algorithm
    # Learned inner learning rates start from inner_optim.lr and are then restored.
    if algorithm.get("learn_inner_lr"):
        picked["inner_optim"] = {"lr": OmegaConf.select(cfg, "inner_optim.lr", default=None)}
    return OmegaConf.create(picked)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def _saved_settings(checkpoint: dict[str, Any], ckpt_path: str) -> tuple[DictConfig, str] | None:
    state = (checkpoint.get("callbacks") or {}).get(_CONFIG_STATE_KEY)
    if isinstance(state, dict) and isinstance(state.get("restored"), str):
        loaded = OmegaConf.create(state["restored"])
        if isinstance(loaded, DictConfig):
            return loaded, f"ckpt_path={ckpt_path}"
    try:
        saved, run_dir = load_run_config(ckpt_path)
    except ConfigError:
        return None
    return _restored_settings(saved), f"{run_dir / CONFIG_FILE}"


def _check_resume(cfg: DictConfig, ckpt_path: str) -> dict[str, Any]:
    """Refuses a resume whose settings differ from what the checkpoint restores, in one line.

    Returns the checkpoint.
    """
    checkpoint = load_checkpoint_file(ckpt_path)
    if "state_dict" not in checkpoint:
        raise CorruptCheckpointError(
            f"ckpt_path={ckpt_path} holds no state_dict: it is not a Lightning checkpoint of "
            "a metalight run"
        )
    saved = _saved_settings(checkpoint, ckpt_path)
    if saved is not None:
        then = _flatten(OmegaConf.to_container(saved[0], resolve=True))
        now = _flatten(OmegaConf.to_container(_restored_settings(cfg), resolve=True))
        changed = [k for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
        if changed:
            listing = "; ".join(
                f"{k}={then.get(k)!r} there, {now.get(k)!r} here" for k in changed[:8]
            )
            more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
            raise ConfigError(
                f"ckpt_path={ckpt_path} restores settings this run changes ({saved[1]}): "
                f"{listing}{more}. A resume continues the saved model and optimizer as they "
                "were: leave these overrides out to resume, or start a new run without "
                "ckpt_path to train with other settings"
            )
    return checkpoint


def _check_fit(module: L.LightningModule, checkpoint: dict[str, Any], ckpt_path: str) -> None:
    """Refuses, in one line, weights that do not fit the model this run builds (checked here,
    before anything is written, rather than as a traceback from inside the trainer)."""
    try:
        module.on_load_checkpoint(checkpoint)
    except RuntimeError as err:
        raise ConfigError(
            f"the weights in ckpt_path={ckpt_path} do not fit the model this run builds: "
            f"{' '.join(str(err).split())}"
        ) from None


def _resume_command(ckpt: str | None) -> str:
    """The command that resumes this run from ``ckpt`` (the same overrides, a new run dir)."""
    overrides: list[str] = []
    if HydraConfig.initialized():
        task = list(HydraConfig.get().overrides.task or [])
        overrides = [
            str(o)
            for o in task
            # A resume runs in a new directory: the old one holds this run.
            if not str(o).lstrip("+~").startswith(("ckpt_path=", "hydra.", "paths.run_dir="))
        ]
    if ckpt is None:
        return shlex.join(["metalight", "train", *overrides])
    return shlex.join(["metalight", "train", *overrides, f"ckpt_path={Path(ckpt).resolve()}"])


def _remove_failed_start(run_dir: Path) -> None:
    """Removes a run directory this process created when the run failed before saving any
    checkpoint or result, so that failed starts leave no half-empty run behind."""
    if not created_here(run_dir) or not run_dir.is_dir():
        return
    if (run_dir / RESULTS_FILE).exists() or any((run_dir / "checkpoints").glob("*.ckpt")):
        return
    shutil.rmtree(run_dir, ignore_errors=True)


def _checkpoint_dir(components: Components, run_dir: Path) -> Path:
    for callback in components.trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath)
    return run_dir / "checkpoints"


def _finish_interrupted(
    stop: RunInterrupted,
    cfg: DictConfig,
    components: Components | None,
    run_dir: Path,
    start_step: int,
    seconds: float,
    requeue_job: str | None = None,
) -> None:
    name = signal.Signals(stop.signum).name
    resume = _resume_command(stop.checkpoint)
    results = _base_results(cfg, "train", run_dir)
    results.update(
        metrics={},
        steps=stop.step,
        steps_this_run=stop.step - start_step,
        start_step=start_step,
        seconds=seconds,
        checkpoint=stop.checkpoint,
        resumed_from=cfg.get("ckpt_path"),
        interrupted={
            "signal": name,
            "phase": stop.phase,
            "step": stop.step,
            "checkpoint": stop.checkpoint,
            "resume": resume,
        },
    )
    files: dict[str, str] = {"config": str(run_dir / CONFIG_FILE)}
    if components is not None and (csv_path := _csv_path(components)) is not None:
        files["metrics_csv"] = str(csv_path)
    results["files"] = files
    if _slurm_job_id():
        results["slurm_job_id"] = _slurm_job_id()
        if (overrides := _task_overrides()) is not None:
            results["overrides"] = overrides  # how a requeued job tells its own run
    try:
        if requeue_job is not None:
            # Recorded before requeueing: the requeued job looks for it to resume.
            results["interrupted"]["requeued"] = True
            _save(run_dir, results)
            results["interrupted"]["requeue"] = _requeue(requeue_job)
        _save(run_dir, results)
    finally:
        print(format_summary(results), flush=True)
        print(
            f"metalight train: interrupted by {name} at meta-iteration {stop.step}; resume "
            f"with: {resume}",
            file=sys.stderr,
            flush=True,
        )


def _slurm_job_id() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None and os.environ.get("SLURM_ARRAY_TASK_ID") is not None:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def _requeue_signal(trainer: L.Trainer) -> int | None:
    """The signal on which the run requeues itself (trainer=slurm), else None."""
    environment = trainer._accelerator_connector.cluster_environment
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return int(environment.requeue_signal or signal.SIGUSR1)
    return None


def _auto_requeue_configured(cfg: DictConfig) -> bool:
    for node in OmegaConf.select(cfg, "trainer.plugins", default=None) or []:
        target = str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""
        if target.endswith("SLURMEnvironment"):
            return bool(node.get("auto_requeue", True))
    return False


def _task_overrides() -> list[str] | None:
    """This job's own overrides (a sweep job's values included), without the ones a resume
    changes; None outside Hydra."""
    if not HydraConfig.initialized():
        return None
    return [
        str(o)
        for o in HydraConfig.get().overrides.task or []
        if not str(o).lstrip("+~").startswith(("ckpt_path=", "paths.run_dir="))
    ]


def _requeue_search_dirs(cfg: DictConfig) -> list[Path]:
    """Where a stopped run of this job may live: under ``paths.output_dir`` at any depth (a
    sweep's runs are ``<sweep dir>/<subdir>``), and in this sweep's directory, which may be
    elsewhere (``hydra.sweep.dir=...``)."""
    roots = [Path(str(OmegaConf.select(cfg, "paths.output_dir", default="runs")))]
    if HydraConfig.initialized():
        hydra_cfg = _hydra_node()
        sweep = OmegaConf.select(hydra_cfg, "sweep.dir", default=None)
        if sweep and hydra_cfg.get("mode") == RunMode.MULTIRUN:
            roots.append(Path(str(sweep)))
    kept: list[Path] = []
    for root in roots:
        root = root.expanduser().resolve()
        # A root inside another is searched with it.
        if root.is_dir() and not any(root.is_relative_to(k) for k in kept):
            kept = [k for k in kept if not k.is_relative_to(root)] + [root]
    return kept


def _requeued_checkpoint(cfg: DictConfig, job: str) -> tuple[str, Path] | None:
    """The checkpoint and run directory of the latest run of SLURM job ``job`` (the same job,
    or the same task of a job array) that stopped to be requeued, wherever it lives.

    A run that recorded its overrides must have had this job's: with several runs under one
    job id (a sweep's jobs run in one allocation) each finds its own.
    """
    overrides = _task_overrides()
    best: tuple[int, float, str, Path] | None = None
    seen: set[Path] = set()
    for root in _requeue_search_dirs(cfg):
        for results_file in root.rglob(RESULTS_FILE):
            if results_file in seen:
                continue
            seen.add(results_file)
            try:
                results = json.loads(results_file.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(results, dict):
                continue
            stop = results.get("interrupted") or {}
            ckpt = stop.get("checkpoint")
            if results.get("slurm_job_id") != job or not stop.get("requeued") or not ckpt:
                continue
            recorded = results.get("overrides")
            if recorded is not None and overrides is not None and recorded != overrides:
                continue
            if Path(ckpt).is_file():
                key = (
                    int(stop.get("step", 0)),
                    results_file.stat().st_mtime,
                    str(ckpt),
                    results_file.parent,
                )
                best = max(best, key) if best else key
    return (best[2], best[3]) if best else None


def _requeue(job: str) -> str:
    """Asks SLURM to requeue ``job``; returns what happened, for results.json."""
    try:
        done = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, check=False
        )
    except OSError as err:
        return f"scontrol requeue {job} could not run: {err}"
    if done.returncode != 0:
        return f"scontrol requeue {job} failed ({done.returncode}): {done.stderr.strip()}"
    return f"requeued SLURM job {job}"


def train(cfg: DictConfig) -> dict[str, Any]:
    """Meta-train, test on the held-out tasks, and write the run directory.

    The run directory receives ``config.yaml`` (the composed config, resolved),
    ``checkpoints/`` (``last.ckpt``), ``logs/metrics.csv`` (and ``tensorboard/`` when
    installed), ``results.json``, then (best effort) ``training_curves.png`` and, for
    sinusoid data, ``sinusoid_tasks.png``. ``ckpt_path`` resumes training from a checkpoint;
    a resume may not change what the checkpoint restores (model, outer optimizer,
    scheduler, algorithm).

    ``SIGTERM`` and ``SIGINT`` (Ctrl-C) stop the run at the end of the step in progress: it
    is saved to ``checkpoints/last.ckpt``, ``results.json`` records the interruption and the
    command that resumes it, and :class:`RunInterrupted` is raised (the command exits with
    143 or 130). The resumed run continues exactly as if it had never stopped.

    Args:
        cfg: a composed ``train`` config (``configs/train.yaml`` with overrides).

    Returns:
        ``{"metrics": {test metric: value}, "run_dir": str, "checkpoint": str | None,
        "steps": int (in total), "steps_this_run": int, "seconds": float (this process's
        training time), "recipe": ..., "files": {...}, ...}``.

    Raises:
        ConfigError: for a value that cannot work (checked before anything is written).
        RunInterrupted: when a signal stopped the run (after saving it).

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
    interrupts = _Interrupts().install()
    try:
        return _train(cfg, interrupts)
    finally:
        interrupts.restore()


def _train(cfg: DictConfig, interrupts: _Interrupts) -> dict[str, Any]:
    ckpt_path = cfg.get("ckpt_path")
    job = _slurm_job_id()
    requeued = None
    if ckpt_path is None and job and _auto_requeue_configured(cfg):
        requeued = _requeued_checkpoint(cfg, job)
    run_dir = resolve_run_dir(cfg)
    if requeued is not None:
        ckpt_path, stopped_dir = requeued
        print(f"metalight: SLURM job {job} was requeued: resuming from {ckpt_path}")
        if run_dir.resolve() == stopped_dir.resolve():
            # A sweep job with a fixed hydra.sweep.dir is given its directory again; the
            # resume goes beside it, as every resume goes to a new directory.
            run_dir = make_run_dir(run_dir.parent, f"{run_dir.name}-requeued")
        cfg = _with_run_dir(cfg, run_dir)
        with open_dict(cfg):
            cfg.ckpt_path = ckpt_path
    components: Components | None = None
    requeue_on: int | None = None
    resumed: dict[str, Any] | None = None
    interrupt: _InterruptCallback | None = None
    start_step = 0
    started = time.monotonic()
    trained = False
    try:
        if ckpt_path is not None and Path(str(ckpt_path)).expanduser().is_dir():
            raise ConfigError(
                f"ckpt_path={ckpt_path} is a directory, not a checkpoint file; give a .ckpt "
                f"file in it, e.g. ckpt_path={Path(str(ckpt_path)) / 'last.ckpt'}"
            )
        validate_config(cfg)
        configure_torch(cfg)
        if getattr(rank_zero_only, "rank", 0) == 0:
            refuse_used_run_dir(run_dir, hydra_files=False)
        if ckpt_path is not None:
            resumed = _check_resume(cfg, str(ckpt_path))
            start_step = int(resumed.get("global_step", 0))
        cfg = _with_run_dir(cfg, run_dir)
        components = build(cfg)
        if resumed is not None:
            _check_fit(components.module, resumed, str(ckpt_path))
            resumed = None  # the trainer loads it again: do not hold two copies
        trainer = components.trainer
        requeue_on = _requeue_signal(trainer) if job else None
        if requeue_on is not None:
            # Installed before fit, so Lightning keeps it instead of its own requeue handler
            # (which saves in the middle of a step).
            interrupts.install([requeue_on])
        skipped = skip_absent_splits(components)  # training on every class: nothing held out
        interrupt = _InterruptCallback(
            interrupts, _checkpoint_dir(components, run_dir) / "last.ckpt"
        )
        interrupt.resumed_from = str(ckpt_path) if ckpt_path is not None else None
        trainer.callbacks.extend([interrupt, _RunConfigRecord(cfg)])  # type: ignore[attr-defined]
        if getattr(rank_zero_only, "rank", 0) == 0:
            atomic_write(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
        started = time.monotonic()
        # weights_only: a checkpoint holds tensors and plain values (checked above), and loading
        # one must never run code a damaged or foreign file carries.
        trainer.fit(
            components.module,
            datamodule=components.datamodule,
            ckpt_path=ckpt_path,
            weights_only=True if ckpt_path is not None else None,
        )
        trained = True
        seconds = time.monotonic() - started
        if interrupts.signum is not None:  # came after the last step's check
            raise RunInterrupted(
                interrupts.signum, trainer.global_step, _last_checkpoint(components), "saving"
            )
        test = (
            []
            if "test" in skipped
            else trainer.test(components.module, datamodule=components.datamodule, verbose=False)
        )
    except RunInterrupted as stop:
        if stop.phase != "training" and stop.checkpoint is None and trained:
            stop.checkpoint = _last_checkpoint(components) if components else None
        if components is None or components.trainer.is_global_zero:
            requeue = job if job and stop.signum == requeue_on else None
            _finish_interrupted(
                stop, cfg, components, run_dir, start_step, time.monotonic() - started, requeue
            )
        raise
    except BaseException as err:
        # A run that never trained a step failed to start: it leaves no directory behind.
        if getattr(rank_zero_only, "rank", 0) == 0 and (
            interrupt is None or interrupt.steps_done == 0
        ):
            _remove_failed_start(run_dir)
        # A full disk met by a logger (metrics.csv, ...) reads as "[Errno 28]" deep inside it.
        full = as_disk_full(err, run_dir) if isinstance(err, Exception) else None
        if full is not None and full is not err:
            raise full from None
        raise
    results = _base_results(cfg, "train", run_dir)
    results.update(
        metrics=_float_metrics(test),
        steps=int(trainer.global_step),
        steps_this_run=int(trainer.global_step) - start_step,
        start_step=start_step,
        seconds=seconds,
        checkpoint=_last_checkpoint(components),
        resumed_from=ckpt_path,
    )
    if isinstance(components.module, BilevelModule):
        results["eval_inner_steps"] = _tested_steps(components.module)
    if baseline := pop_baseline(results["metrics"]):
        results["baseline"] = baseline
    if skipped:
        results["skipped_splits"] = skipped
    if (selection := describe_selection(trainer)) is not None:
        results["selection"] = selection  # which weights were tested (callbacks=best)
    if trackers := finish_trackers(trainer.loggers, cfg, results["metrics"]):
        results["trackers"] = trackers
    if trainer.is_global_zero:
        # The results first, atomically: pictures are extras that must not cost them.
        csv_path = _csv_path(components)
        results["files"] = {"config": str(run_dir / CONFIG_FILE)}
        if csv_path is not None:
            results["files"]["metrics_csv"] = str(csv_path)
        try:
            _save(run_dir, results)
        finally:
            print(format_summary(results), flush=True)
        if interrupts.signum is None and _write_pictures(components, run_dir, results, csv_path):
            try:
                _save(run_dir, results)
            except DiskFullError as err:
                _warn(f"{err}; results.json keeps the results without the pictures' names")
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
    if ckpt.is_dir():
        raise ConfigError(
            f"ckpt_path={ckpt_path} is a directory, not a checkpoint file; give a .ckpt file "
            f"in it, e.g. ckpt_path={Path(ckpt_path) / 'last.ckpt'}"
        )
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
                f"+{str(override.input_line).lstrip('+')}): {err}"
            ) from None
    return cfg


def load_weights(
    module: L.LightningModule, ckpt_path: str | os.PathLike[str], *, label: str | None = None
) -> None:
    """Loads only a checkpoint's weights into ``module``, checked to fit first (the one
    loader of ``metalight eval`` and :func:`metalight.load`).

    Args:
        module: The module the run's config builds.
        ckpt_path: The checkpoint (verified by its zip CRCs, tensors and plain values only).
        label: How messages name the file (default ``ckpt_path=PATH``, the config key).

    Raises:
        ConfigError: If it holds no state_dict or its weights do not fit ``module``.
        CorruptCheckpointError, FileNotFoundError, IsADirectoryError: As
            :func:`~metalight.lightning.checkpoint_io.load_checkpoint_file`.
    """
    # Only the weights: restoring the whole training state through trainer.test(ckpt_path=)
    # would also ask for the training callbacks, which an evaluation does not use.
    name = label or f"ckpt_path={ckpt_path}"
    checkpoint = load_checkpoint_file(ckpt_path)
    if "state_dict" not in checkpoint:
        raise ConfigError(f"{name} holds no state_dict: not a Lightning checkpoint")
    try:
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise ConfigError(
            f"the weights in {ckpt_path} do not fit the model of its run's config.yaml: "
            f"{' '.join(str(err).split())}"
        ) from None


def _refuse_no_test_split(
    cfg: DictConfig, datamodule: L.LightningDataModule, ckpt_path: str | os.PathLike[str]
) -> None:
    """A run trained on every class has nothing held out to test on: one line saying what
    to evaluate it on instead (before the data module's own message from inside test)."""
    split_names = getattr(datamodule, "split_names", None)
    if split_names is None or "test" in split_names():
        return
    target = str(OmegaConf.select(cfg, "data._target_", default="")).rsplit(".", 1)[-1]
    held_out = {
        "ImageFolderDataModule": "give a folder of classes it did not train on with "
        "data.test_root=DIR",
        # Omniglot's classes were all trained on: held-out ones need a new training run.
        "OmniglotDataModule": "train again holding test classes out "
        "(data.num_train_characters=1200, or data.test_alphabets=[...] with "
        "data.split=alphabet)",
    }.get(target, "train again holding test classes out of the data")
    raise ConfigError(
        f"the run of {ckpt_path} trained on every class of its data, so there are no "
        "held-out test classes to evaluate on: score fixed episodes with "
        f"`metalight eval ckpt_path={ckpt_path} data=episodes data.root=DIR` "
        f"(DIR/<episode>/support|query/<class>/<image>), or {held_out}"
    )


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
    _refuse_no_test_split(cfg, datamodule, ckpt_path)
    module = build_module(cfg)
    load_weights(module, ckpt_path)
    trainer = build_trainer(cfg, loggers=[], callbacks=[])
    test = trainer.test(module, datamodule=datamodule, verbose=False)
    if not trainer.is_global_zero:
        return {"metrics": _float_metrics(test)}
    out_dir = make_run_dir(run_dir / "eval")
    results = _base_results(cfg, "eval", out_dir)
    results.update(metrics=_float_metrics(test), checkpoint_evaluated=str(ckpt_path))
    if isinstance(module, BilevelModule):
        results["eval_inner_steps"] = _tested_steps(module)
    if baseline := pop_baseline(results["metrics"]):
        results["baseline"] = baseline  # apart from the method's, as train reports it
    components = Components(datamodule, module, trainer)
    atomic_write(out_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    results["files"] = {"config": str(out_dir / CONFIG_FILE)}
    # The results first: the picture is an extra that must not cost them.
    try:
        _save(out_dir, results)
    finally:
        print(format_summary(results), flush=True)
    if _write_pictures(components, out_dir, results, None):
        try:
            _save(out_dir, results)
        except DiskFullError as err:
            _warn(f"{err}; results.json keeps the results without the picture's name")
    return results
