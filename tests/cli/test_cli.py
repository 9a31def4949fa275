"""The real ``metalight`` command: help, recipes, a tiny training run and its run directory,
evaluation, resuming, sweeps, DDP, Omniglot, and clear errors without tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from metalight.cli import main
from metalight.run import list_recipes
from metalight.run.build import tensorboard_available
from tests.cli.conftest import TINY, only_run_dir, run_cli

PNG = b"\x89PNG\r\n\x1a\n"


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "recipes"):
        assert f"\n  {command} " in out


def test_recipes_lists_each_recipe_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for recipe in list_recipes():
        (line,) = [x for x in lines if x.split() and x.split()[0] == recipe.name]
        assert recipe.description in line


def test_train_help_lists_config_groups_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "model: conv4, mlp, resnet12" in out
    assert "inner_optim: adadelta, adagrad, adam, adamax, adamw, asgd, nadam, radam" in out
    assert (
        "recipe: anil, distill, fomaml, hyper_lr, imaml, maml, meta_sgd, omniglot_maml_5w1s" in out
    )
    assert (
        "data: digits, episodes, image_folder, mini_imagenet, noisy_digits, omniglot, sinusoid"
        in out
    )
    assert "trainer: cpu, ddp, gpu" in out


def test_eval_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--help"]) == 0
    assert "ckpt_path=PATH" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One tiny real run of `metalight train +recipe=maml`: (its run directory, stdout)."""
    cwd = tmp_path_factory.mktemp("cli")
    done = run_cli(["train", "+recipe=maml", *TINY], cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return only_run_dir(cwd / "runs"), done.stdout


def test_train_writes_the_run_directory(trained: tuple[Path, str]) -> None:
    run_dir, stdout = trained
    assert "metalight train finished" in stdout
    assert "recipe    maml" in stdout and "95% CI over 8 tasks" in stdout
    assert f"run dir   {run_dir}" in stdout
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.recipe.name == "maml" and cfg.trainer.max_steps == 3
    assert cfg.paths.run_dir == str(run_dir)
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    metrics = (run_dir / "logs" / "metrics.csv").read_text()
    assert "train/meta_loss" in metrics.splitlines()[0]
    for picture in ("training_curves.png", "sinusoid_tasks.png"):
        assert (run_dir / picture).read_bytes().startswith(PNG)
    assert (run_dir / "tensorboard").is_dir() == tensorboard_available()
    results = _results(run_dir)
    assert results["steps"] == 3 and results["recipe"] == "maml"
    for key in ("test/loss_pre", "test/loss_post", "test/loss_step1", "test/loss_post_ci95"):
        assert key in results["metrics"]
    assert results["metrics"]["test/episodes"] == 8


def _main_in(cwd: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> int:
    """The command run in this process (faster than a new one) from ``cwd``."""
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    return main(argv)


def test_eval_rebuilds_the_checkpoint_and_reproduces_the_test(
    trained: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, _ = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    argv = ["eval", f"ckpt_path={ckpt}", "trainer.enable_progress_bar=false"]
    assert _main_in(tmp_path, monkeypatch, argv) == 0
    (eval_dir,) = (run_dir / "eval").iterdir()
    evaluated = _results(eval_dir)
    assert evaluated["checkpoint_evaluated"] == str(ckpt)
    assert (eval_dir / "sinusoid_tasks.png").read_bytes().startswith(PNG)
    trained_metrics = _results(run_dir)["metrics"]
    for key, value in trained_metrics.items():
        assert evaluated["metrics"][key] == pytest.approx(value, rel=1e-5), key


def test_train_resumes_from_a_checkpoint_into_a_new_run_directory(
    trained: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, _ = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    argv = ["train", "+recipe=maml", *TINY, "trainer.max_steps=5", f"ckpt_path={ckpt}"]
    assert _main_in(tmp_path, monkeypatch, argv) == 0
    resumed = only_run_dir(tmp_path / "runs")
    assert resumed != run_dir
    results = _results(resumed)
    assert results["steps"] == 5 and results["resumed_from"] == str(ckpt)
    # A fresh start would also end at step 5: the run must have started from the
    # checkpoint's step 3 and trained only the 2 steps after it.
    assert (results["start_step"], results["steps_this_run"]) == (3, 2)


def test_resuming_with_another_seed_is_refused_in_one_line(
    trained: tuple[Path, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir, _ = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    argv = ["train", "+recipe=maml", *TINY, "trainer.max_steps=5", "seed=7", f"ckpt_path={ckpt}"]
    assert _main_in(tmp_path, monkeypatch, argv) == 2
    err = capsys.readouterr().err
    assert "drawn with seed=0, this run has seed=7" in err
    assert "Traceback" not in err


def test_the_command_never_reuses_a_run_directory(
    trained: tuple[Path, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir, _ = trained
    before = sorted(p.name for p in run_dir.iterdir())
    argv = ["train", "+recipe=maml", *TINY, f"hydra.run.dir={run_dir}"]
    assert _main_in(tmp_path, monkeypatch, argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_multirun_sweeps_recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _main_in(tmp_path, monkeypatch, ["train", "-m", "+recipe=maml,anil", *TINY]) == 0
    sweep = only_run_dir(tmp_path / "runs" / "multirun")
    recipes = sorted(_results(job)["recipe"] for job in sweep.iterdir() if job.name.isdigit())
    assert recipes == ["anil", "maml"]


def test_omniglot_recipe_trains_on_the_small_sets(
    synthetic_omniglot_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The subject is the command's wiring, so the synthetic small sets (same alphabets) do.
    argv = [
        "train",
        "+recipe=omniglot_maml_5w1s",
        f"data.root={synthetic_omniglot_dir}",
        "model.hidden=8",
        *TINY,
        "trainer.max_steps=2",
        "data.meta_batch_size=2",
        "data.test_episodes=4",
    ]
    assert _main_in(tmp_path, monkeypatch, argv) == 0
    run_dir = only_run_dir(tmp_path / "runs")
    results = _results(run_dir)
    assert {"test/acc_pre", "test/acc_post", "test/acc_post_ci95"} <= set(results["metrics"])
    assert (run_dir / "training_curves.png").read_bytes().startswith(PNG)
    assert not (run_dir / "sinusoid_tasks.png").exists()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path: Path) -> None:
    args = ["train", "+recipe=maml", *TINY, "trainer=ddp", "trainer.accelerator=cpu"]
    done = run_cli(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = _results(only_run_dir(tmp_path / "runs"))
    assert results["metrics"]["test/episodes"] == 8 and results["steps"] == 3


ERRORS = [
    (["train", "+recipe=nope"], "unknown recipe 'nope'; available recipes: anil, distill, fomaml"),
    (["train", "model=nope"], "unknown option 'nope' for config group 'model'; available: conv4"),
    (["train", "+recipe=maml", "algorithm.inner_steps=abc"], "algorithm.inner_steps must be"),
    (
        ["train", "+recipe=omniglot_maml_5w1s", "data.root=/no/such/dir"],
        "data.root=/no/such/dir does not exist",
    ),
    (["train", "ckpt_path=/no/such.ckpt"], "ckpt_path=/no/such.ckpt does not exist"),
    (["train", "not_a_key=1"], "Could not override 'not_a_key'"),
    (["eval", "ckpt_path=/no/such.ckpt"], "ckpt_path=/no/such.ckpt does not exist"),
    (["eval"], "eval needs a checkpoint: metalight eval ckpt_path=PATH"),
    (["frobnicate"], "unknown command 'frobnicate'"),
]


@pytest.mark.parametrize(("argv", "message"), ERRORS)
def test_bad_input_gets_one_clear_line(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert f"metalight {argv[0]}: error: " in err


def test_errors_exit_2_without_traceback_from_the_real_process(tmp_path: Path) -> None:
    done = run_cli(["train", "+recipe=nope"], tmp_path)
    assert done.returncode == 2
    assert "unknown recipe 'nope'" in done.stderr and "Traceback" not in done.stderr
    assert "omniglot_maml_5w1s" in done.stderr
