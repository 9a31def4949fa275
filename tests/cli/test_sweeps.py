"""Hyperparameter search with Hydra's Optuna sweeper (hparams_search=sinusoid_maml), and
launches through Hydra's submitit launcher: real runs of the command, on this machine."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from omegaconf import DictConfig, OmegaConf

from metalight.cli import main
from tests.cli.conftest import TINY

with warnings.catch_warnings():
    # optuna 2.x (what the sweeper needs) on SQLAlchemy 1.4 warns once about SQLAlchemy 2.
    warnings.filterwarnings("ignore", message=".*SQLAlchemy 2.0.*")
    optuna = pytest.importorskip("optuna", reason="pip install metalight[sweep]")

STUDY = Path("runs/sweeps/sinusoid_maml")
# Validation after every meta-iteration, so each trial has a best validation score.
TRIAL = ["+recipe=maml", "logger=none", *TINY, "trainer.max_steps=2"]
TRIAL += ["data.train_batches_per_epoch=1", "paths.output_dir=runs"]


def _sweep(trials: int) -> int:
    return main(
        ["train", "-m", "hparams_search=sinusoid_maml", f"hydra.sweeper.n_trials={trials}", *TRIAL]
    )


def _check_best(trials: list[dict], expected_count: int) -> dict:
    study = optuna.load_study(study_name="sinusoid_maml", storage=f"sqlite:///{STUDY}/optuna.db")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == len(trials) == expected_count
    best = yaml.safe_load((STUDY / "best_trial.yaml").read_text())
    values = [t["value"] for t in trials]
    assert best["value"] == min(values) == study.best_value
    assert best["trials"] == expected_count
    assert best["params"] == study.best_params
    assert set(best["params"]) == {"inner_optim.lr", "algorithm.inner_steps", "outer_optim.lr"}
    # The value is the run's best validation MSE, and its config holds the parameters.
    results = json.loads((Path(best["run_dir"]) / "results.json").read_text())
    assert results["selection"]["metric"] == "val/loss_post"
    assert results["selection"]["score"] == best["value"]
    config = yaml.safe_load(Path(best["config"]).read_text())
    assert config["algorithm"]["inner_steps"] == best["params"]["algorithm.inner_steps"]
    assert config["inner_optim"]["lr"] == best["params"]["inner_optim.lr"]
    return best


def _records() -> list[dict]:
    return [json.loads(line) for line in (STUDY / "trials.jsonl").read_text().splitlines()]


def test_optuna_sweep_reports_the_best_trial_and_resumes_its_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _sweep(3) == 0
    trials = _records()
    assert [t["status"] for t in trials] == ["COMPLETED"] * 3
    assert len({t["value"] for t in trials}) == 3  # three different trials, really run
    best = _check_best(trials, 3)
    out = capsys.readouterr().out
    assert f"best of 3 trials in study sinusoid_maml: trial {best['number']}" in out
    # The default sweep directory the search config replaces leaves no empty folder behind.
    assert sorted(p.name for p in Path("runs").iterdir()) == ["sweeps"]

    # The same command again continues the study: one more trial, the best of all four.
    assert _sweep(1) == 0
    _check_best(_records(), 4)
    assert "best of 4 trials" in capsys.readouterr().out


def test_search_spaces_compose(compose_train: Callable[..., DictConfig]) -> None:
    from hydra import compose, initialize_config_dir

    from metalight.run import config_dir

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        for name, metric, direction in [
            ("sinusoid_maml", "val/loss_post", "minimize"),
            ("omniglot_maml", "val/acc_post", "maximize"),
        ]:
            cfg = compose("train", [f"hparams_search={name}"], return_hydra_config=True)
            assert cfg.optimized_metric == metric
            assert cfg.hydra.sweeper.direction == direction
            assert cfg.hydra.sweeper.study_name == name
            assert set(cfg.hydra.sweeper.params) == {
                "inner_optim.lr",
                "algorithm.inner_steps",
                "outer_optim.lr",
            }
            assert "best_checkpoint" in cfg.callbacks


def test_submitit_local_launches_a_two_job_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="metalight[cluster]")
    monkeypatch.chdir(tmp_path)
    code = main(
        ["train", "-m", "hydra/launcher=local", "seed=0,1", "hydra.sweep.dir=sweep", *TRIAL]
    )
    assert code == 0
    jobs = sorted(p for p in Path("sweep", ".submitit").iterdir() if p.name.isdigit())
    assert len(jobs) == 2  # two submitit jobs, each a process of its own ...
    results = [json.loads((Path("sweep", str(n), "results.json")).read_text()) for n in (0, 1)]
    # ... that trained the run its overrides asked for.
    seeds = [yaml.safe_load(Path(r["run_dir"], "config.yaml").read_text())["seed"] for r in results]
    assert seeds == [0, 1]
    assert results[0]["metrics"]["test/loss_post"] != results[1]["metrics"]["test/loss_post"]
    for job in jobs:
        assert any(job.glob("*_result.pkl"))
    # Nor does any job process leave an empty runs/multirun/<time> folder (the default
    # hydra.sweep.dir, which OmegaConf evaluates while merging the given one).
    assert not Path("runs").exists()


def test_slurm_launcher_config_makes_a_valid_job_array(
    tmp_path: Path, compose_train: Callable[..., DictConfig]
) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="metalight[cluster]")
    from hydra import compose, initialize_config_dir
    from submitit.slurm import slurm

    from metalight.run import config_dir

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose(
            "train",
            ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path}"],
            return_hydra_config=True,
        )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher.pop("_target_").endswith("submitit_launcher.SlurmLauncher")
    assert launcher.pop("submitit_folder") == f"{tmp_path}/.submitit/%j"
    # What the launcher hands submitit, turned into the sbatch script of a job array by
    # submitit's own code (an unknown or misspelt setting fails here).
    generic = slurm.SlurmExecutor._equivalence_dict()
    params = {generic.get(k, k): v for k, v in launcher.items() if v is not None}
    params.pop("max_num_timeout")  # the executor's, not sbatch's
    params["mem"] = f"{params['mem']}GB"
    script = slurm._make_sbatch_string(command="true", folder=tmp_path, map_count=100, **params)
    for line in [
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=32GB",
        "#SBATCH --time=720",
        "#SBATCH --array=0-99%32",  # 100 runs, at most 32 at once
        "#SBATCH --requeue",
        "#SBATCH --signal=USR1@120",
    ]:
        assert line in script.splitlines(), line
