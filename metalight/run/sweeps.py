"""Hyperparameter searches (``metalight train -m hparams_search=NAME``): a Hydra callback that
keeps a record of every trial and, at the end, reports the best one.

Hydra's Optuna sweeper asks its study for parameters, runs one ``metalight train`` per trial
and tells the study the value each returned (:func:`metalight.run.selection.objective`). The
study lives in a SQLite file in the sweep directory, so running the same command again
resumes it: the new trials add to the old ones. :class:`SweepReport`, listed under
``hydra.callbacks`` by the search configs, appends each trial to ``trials.jsonl`` there and,
when the sweep ends, prints the best trial of the whole study and writes it to
``best_trial.yaml`` (its value, parameters, run directory, config and command).

Example:
    >>> report = SweepReport()
    >>> report.trials_file
    'trials.jsonl'
"""

from __future__ import annotations

import json
import shlex
import warnings
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from metalight.lightning.checkpoint_io import atomic_write

__all__ = ["SweepReport", "best_trial"]

BEST_FILE = "best_trial.yaml"


def _sqlite_file(storage: str | None) -> Path | None:
    if storage and storage.startswith("sqlite:///"):
        return Path(storage.removeprefix("sqlite:///")).expanduser()
    return None


def _read_trials(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def best_trial(
    study_name: str, storage: str, trials: list[dict[str, Any]] | None = None
) -> dict[str, Any] | None:
    """The best finished trial of an Optuna study, with its run when ``trials`` records it.

    Args:
        study_name: the study (``hydra.sweeper.study_name``).
        storage: its storage URI (``hydra.sweeper.storage``).
        trials: the records of :class:`SweepReport` (``overrides``, ``value``, ``run_dir``).

    Returns:
        ``{"number", "value", "params", "trials"}`` (``trials``: finished trials in the study),
        plus ``"run_dir"``, ``"config"`` and ``"overrides"`` of the run that scored it when
        found; ``None`` if no trial has finished.

    Example:
        >>> import tempfile
        >>> best_trial("none", f"sqlite:///{tempfile.mkdtemp()}/x.db") is None
        True
    """
    with warnings.catch_warnings():
        # optuna 2.x (what the sweeper needs) on SQLAlchemy 1.4 warns once about SQLAlchemy 2.
        warnings.filterwarnings("ignore", message=".*SQLAlchemy 2.0.*")
        import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # no such study (yet)
        return None
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return None
    best = study.best_trial
    found: dict[str, Any] = {
        "number": best.number,
        "value": best.value,
        "params": dict(best.params),
        "trials": len(done),
    }
    wanted = {f"{name}={value}" for name, value in best.params.items()}
    for record in trials or []:
        if record.get("value") == best.value and wanted <= set(record.get("overrides", [])):
            found["run_dir"] = record["run_dir"]
            found["config"] = str(Path(record["run_dir"]) / "config.yaml")
            found["overrides"] = record["overrides"]
            break
    return found


class SweepReport(Callback):
    """Hydra callback of ``hparams_search`` configs: records trials, reports the best.

    Args:
        trials_file: the name of the record of trials in the sweep directory.

    Example:
        >>> SweepReport(trials_file="trials.jsonl").trials_file
        'trials.jsonl'
    """

    def __init__(self, trials_file: str = "trials.jsonl") -> None:
        self.trials_file = trials_file

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The study's SQLite file is created by Optuna, its folder is not.
        Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        database = _sqlite_file(OmegaConf.select(config, "hydra.sweeper.storage"))
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        completed = job_return.status == JobStatus.COMPLETED
        value = job_return.return_value if completed else None
        record = {
            "overrides": list(job_return.overrides or []),
            "value": None if value is None else float(value),
            "status": job_return.status.name,
            "run_dir": str(config.hydra.runtime.output_dir),
        }
        path = Path(str(config.hydra.sweep.dir)) / self.trials_file
        # One short line per append: whole even when jobs of a launcher finish together.
        with path.open("a") as file:
            file.write(json.dumps(record) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        storage = OmegaConf.select(config, "hydra.sweeper.storage")
        study_name = OmegaConf.select(config, "hydra.sweeper.study_name")
        if not storage or not study_name:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        found = best_trial(study_name, storage, _read_trials(sweep_dir / self.trials_file))
        if found is None:
            print(f"metalight sweep: no trial of study {study_name} finished", flush=True)
            return
        metric = OmegaConf.select(config, "optimized_metric", default=None)
        direction = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
        report: dict[str, Any] = {
            "study": study_name,
            "storage": storage,
            "metric": metric,
            "direction": str(direction),
            **found,
        }
        if "overrides" in found:
            report["command"] = shlex.join(["metalight", "train", *found["overrides"]])
        atomic_write(sweep_dir / BEST_FILE, OmegaConf.to_yaml(OmegaConf.create(report)))
        params = " ".join(f"{k}={v}" for k, v in found["params"].items())
        lines = [
            f"metalight sweep: best of {found['trials']} trials in study {study_name}: "
            f"trial {found['number']}, {metric} = {found['value']:.6g}",
            f"  params    {params}",
        ]
        if "run_dir" in found:
            lines.append(f"  config    {found['config']}")
        lines.append(f"  written   {sweep_dir / BEST_FILE} (resume: run the same command again)")
        print("\n".join(lines), flush=True)
