"""SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) save the step in progress, write
what the run has, print the resume command and exit 143 / 130; the resume then finishes
bitwise as the uninterrupted run does; with ``trainer=slurm``, SIGUSR1 also requeues the job
and the requeued job resumes by itself. The run stopped by SIGTERM is a real ``metalight``
process (its exit status is the process's); the others call the same command in this process
meanwhile, which spares a fresh Python's imports for each.

The signal is sent by the process itself, through the test hook ``METALIGHT_TEST_SIGNAL_AT_STEP``
(``STEP[:SIGNAL]``: the signal arrives while meta-iteration STEP trains), at a step drawn at
random (printed in every failure), always before the first periodic checkpoint (every 100).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from metalight.cli import main
from metalight.run.train import SIGNAL_AT_STEP_ENV
from tests.reliability._helpers import assert_identical, finish_cli, start_cli

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

STEPS = 12
# Two epochs of 5 meta-batches (validation after each) and part of a third.
ARGS = [
    "train",
    "+recipe=maml",
    f"trainer.max_steps={STEPS}",
    "data.meta_batch_size=4",
    "data.train_batches_per_epoch=5",
    "data.val_episodes=4",
    "data.test_episodes=8",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "num_threads=1",  # runs in this process and the real one do the same arithmetic
]
SEED = int(time.time())
STOPS = dict(
    zip(("SIGTERM", "SIGINT", "SIGUSR1"), random.Random(SEED).choices(range(1, STEPS), k=3))
)
CODES = {"SIGTERM": 143, "SIGINT": 130, "SIGUSR1": 128 + int(signal.SIGUSR1)}
# A sweep's job (task 2 of job array 4300) stopped by SIGUSR1: run again in its job, it is
# given the same sweep directory, finds its run there and resumes beside it.
SWEEP_STOP = random.Random(SEED + 1).choice(range(1, STEPS))
SWEEP_ARGS = ["train", "-m", *ARGS[1:], "trainer=slurm", "hydra.sweep.dir=sweep"]


@dataclass
class Done:
    """A finished ``metalight`` process: where it ran and what it said."""

    cwd: Path
    status: int
    out: str
    err: str


def the_run(parent: Path) -> Path:
    (run,) = [p for p in (parent / "runs").iterdir() if p.is_dir()]
    return run


def final_state(run_dir: Path) -> dict:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return {k: checkpoint[k] for k in ("global_step", "state_dict", "optimizer_states")}


def slurm_env(tmp: Path, array_task: int | None = None) -> dict[str, str]:
    """A SLURM job's environment (or a job array's task), with a stand-in ``scontrol`` that
    records its arguments (SLURM is not here; Lightning's SLURMEnvironment, the signal and
    the resume are real)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "meta",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    if array_task is not None:
        env.update(
            SLURM_ARRAY_JOB_ID="4300",
            SLURM_ARRAY_TASK_ID=str(array_task),
            SLURM_JOB_ID=str(4300 + array_task),
        )
    return env


def _run_here(cwd: Path, args: list[str], env: dict[str, str]) -> Done:
    """``metalight ARGS`` called in this process (``main``), in ``cwd`` with ``env`` added:
    the same command path, signals and exit status as a real process, without the seconds
    a fresh Python spends importing torch and Lightning."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        cwd.mkdir(parents=True, exist_ok=True)
        patch.chdir(cwd)
        patch.delenv("HYDRA_FULL_ERROR", raising=False)
        for key, value in env.items():
            patch.setenv(key, value)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(args)
    return Done(cwd, status, out.getvalue(), err.getvalue())


def _run_all(jobs: dict[str, tuple[Path, list[str], dict[str, str]]]) -> dict[str, Done]:
    """The SIGTERM job as a real process (a scheduler's signal to a real ``metalight``, its
    exit status the process's), meanwhile the others in this process, one after another."""
    real = {n: (cwd, start_cli(a, cwd, e)) for n, (cwd, a, e) in jobs.items() if n == "SIGTERM"}
    done = {n: _run_here(*job) for n, job in jobs.items() if n not in real}
    done.update({n: Done(cwd, *finish_cli(proc, cwd)) for n, (cwd, proc) in real.items()})
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Done]]:
    """The uninterrupted run and one run stopped by each signal; then their resumes
    (``NAME/resume``): the printed command, or for SLURM the same command in the same job
    (the requeued job)."""
    threads = torch.get_num_threads()
    try:
        yield _runs(tmp_path_factory)
    finally:
        torch.set_num_threads(threads)  # num_threads=1 of the runs in this process


def _runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Done]:
    first: dict[str, tuple[Path, list[str], dict[str, str]]] = {
        "reference": (tmp_path_factory.mktemp("reference"), ARGS, {})
    }
    for name, step in STOPS.items():
        cwd = tmp_path_factory.mktemp(name)
        env = {SIGNAL_AT_STEP_ENV: f"{step}:{name}"}
        args = ARGS
        if name == "SIGUSR1":
            env.update(slurm_env(cwd))
            args = [*ARGS, "trainer=slurm"]
        first[name] = (cwd, args, env)
    sweep_cwd = tmp_path_factory.mktemp("sweep")
    sweep_env = {SIGNAL_AT_STEP_ENV: f"{SWEEP_STOP}:SIGUSR1", **slurm_env(sweep_cwd, 2)}
    first["sweep"] = (sweep_cwd, SWEEP_ARGS, sweep_env)
    done = _run_all(first)
    second: dict[str, tuple[Path, list[str], dict[str, str]]] = {
        "sweep/resume": (sweep_cwd, SWEEP_ARGS, slurm_env(sweep_cwd, 2))
    }
    for name in STOPS:
        cwd = done[name].cwd
        if name == "SIGUSR1":
            second[f"{name}/resume"] = (cwd, first[name][1], slurm_env(cwd))
            continue
        try:
            results = json.loads((the_run(cwd) / "results.json").read_text())
            resume = shlex.split(results["interrupted"]["resume"])
        except (OSError, ValueError, KeyError):
            continue  # the test of this signal reports why
        second[f"{name}/resume"] = (cwd / "resume", resume[1:], {})
    done.update(_run_all(second))
    return done


def assert_matches_the_reference(runs: dict[str, Done], resumed_dir: Path, where: str) -> None:
    reference = runs["reference"]
    assert reference.status == 0, reference.err[-3000:]
    want = the_run(reference.cwd)
    assert_identical(final_state(resumed_dir), final_state(want), where)
    got_results = json.loads((resumed_dir / "results.json").read_text())
    want_results = json.loads((want / "results.json").read_text())
    assert got_results["metrics"] == want_results["metrics"], where


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_the_step_and_the_resume_ends_bitwise_as_the_uninterrupted_run(
    runs: dict[str, Done], name: str
) -> None:
    where = f"{name} while training step {STOPS[name]} (seed {SEED})"
    stopped = runs[name]
    assert stopped.status == CODES[name], f"{where}: exit {stopped.status}\n{stopped.err[-3000:]}"
    assert "Traceback" not in stopped.err, where
    run_dir = the_run(stopped.cwd)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == STOPS[name], where
    # What the run has is written: the metrics CSV up to the step, and the results.
    csv = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    steps = [int(row.split(",")[1]) for row in csv[1:] if row.split(",")[1]]
    assert max(steps) == STOPS[name] - 1, where  # Lightning's CSV counts steps from 0
    results = json.loads((run_dir / "results.json").read_text())
    interrupted = results["interrupted"]
    assert interrupted["signal"] == name and interrupted["step"] == STOPS[name], where
    assert interrupted["phase"] == "training" and results["metrics"] == {}
    assert interrupted["checkpoint"] == str(checkpoint)
    # The exact command to resume, printed and recorded.
    resume = interrupted["resume"]
    assert resume == shlex.join(["metalight", *ARGS, f"ckpt_path={checkpoint.resolve()}"])
    assert f"resume with: {resume}" in stopped.err and f"resume    {resume}" in stopped.out
    assert not (run_dir / "sinusoid_tasks.png").exists()

    resumed = runs[f"{name}/resume"]
    assert resumed.status == 0, f"{where}: resume failed\n{resumed.err[-3000:]}"
    done = STEPS - STOPS[name]
    plural = "" if done == 1 else "s"
    assert f"trained   {done} meta-iteration{plural} in " in resumed.out
    assert f"(resumed at {STOPS[name]}: {STEPS} in total)" in resumed.out
    resumed_dir = the_run(resumed.cwd)
    assert_matches_the_reference(runs, resumed_dir, where)
    got = json.loads((resumed_dir / "results.json").read_text())
    assert got["steps"] == STEPS and got["steps_this_run"] == done
    assert got["start_step"] == STOPS[name]


def test_trainer_slurm_requeues_itself_and_the_requeued_job_resumes_bitwise(
    runs: dict[str, Done],
) -> None:
    where = f"SIGUSR1 while training step {STOPS['SIGUSR1']} (seed {SEED})"
    stopped = runs["SIGUSR1"]
    assert stopped.status == CODES["SIGUSR1"], f"{where}: exit {stopped.status}\n{stopped.err}"
    assert (stopped.cwd / "scontrol.log").read_text() == "requeue 4242\n"
    first = runs["SIGUSR1/resume"]
    assert first.status == 0, f"{where}: requeued run failed\n{first.err[-3000:]}"
    stopped_dir, resumed_dir = sorted((stopped.cwd / "runs").iterdir())
    results = json.loads((stopped_dir / "results.json").read_text())
    assert results["slurm_job_id"] == "4242" and results["interrupted"]["requeued"] is True
    assert results["interrupted"]["requeue"] == "requeued SLURM job 4242"
    # The requeued job ran the same command (no ckpt_path) and found where to resume.
    ckpt = stopped_dir / "checkpoints" / "last.ckpt"
    assert f"SLURM job 4242 was requeued: resuming from {ckpt}" in first.out
    assert_matches_the_reference(runs, resumed_dir, where)
    got = json.loads((resumed_dir / "results.json").read_text())
    assert got["start_step"] == STOPS["SIGUSR1"] and got["steps"] == STEPS


def test_a_requeued_sweep_job_finds_its_run_in_the_sweep_directory_and_resumes_bitwise(
    runs: dict[str, Done],
) -> None:
    where = f"sweep job stopped by SIGUSR1 while training step {SWEEP_STOP} (seed {SEED})"
    stopped = runs["sweep"]
    assert stopped.status == CODES["SIGUSR1"], f"{where}: exit {stopped.status}\n{stopped.err}"
    assert (stopped.cwd / "scontrol.log").read_text() == "requeue 4300_2\n"
    stopped_dir = stopped.cwd / "sweep" / "0"
    results = json.loads((stopped_dir / "results.json").read_text())
    assert results["slurm_job_id"] == "4300_2" and results["interrupted"]["requeued"] is True
    # Recorded as Hydra hands a sweep's job its overrides (values normalised: False).
    assert len(results["overrides"]) == len(ARGS) and results["overrides"][-1] == "trainer=slurm"
    ckpt = results["interrupted"]["checkpoint"]
    assert Path(ckpt).resolve() == (stopped_dir / "checkpoints" / "last.ckpt").resolve()
    # The requeued job ran the same sweep in the same job array task: Hydra gave it the same
    # directory, where it found its checkpoint; it resumed beside it (runs never share one).
    first = runs["sweep/resume"]
    assert first.status == 0, f"{where}: requeued job failed\n{first.err[-3000:]}"
    assert f"SLURM job 4300_2 was requeued: resuming from {ckpt}" in first.out
    resumed_dir = stopped.cwd / "sweep" / "0-requeued"
    assert_matches_the_reference(runs, resumed_dir, where)
    got = json.loads((resumed_dir / "results.json").read_text())
    assert got["start_step"] == SWEEP_STOP and got["steps"] == STEPS
    assert got["resumed_from"] == ckpt
    # The stopped run is left as it was: its record still says where it stopped.
    assert json.loads((stopped_dir / "results.json").read_text()) == results


def test_a_signal_before_the_first_step_saves_nothing_and_says_how_to_start_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv(SIGNAL_AT_STEP_ENV, "0")
    before = signal.getsignal(signal.SIGTERM)
    threads = torch.get_num_threads()
    try:
        assert main(ARGS) == 143
    finally:
        torch.set_num_threads(threads)
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are given back
    run_dir = the_run(tmp_path)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["interrupted"]["step"] == 0 and results["interrupted"]["checkpoint"] is None
    assert results["interrupted"]["resume"] == shlex.join(["metalight", *ARGS])
    assert not list(run_dir.glob("checkpoints/*.ckpt"))
    assert "nothing to save yet" in capsys.readouterr().out


def _stopped_run(run_dir: Path, job: str, step: int, overrides: list[str] | None) -> str:
    """What a run stopped to be requeued leaves: its checkpoint and results.json."""
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"checkpoint")
    results: dict = {
        "slurm_job_id": job,
        "interrupted": {"requeued": True, "step": step, "checkpoint": str(ckpt)},
    }
    if overrides is not None:
        results["overrides"] = overrides
    (run_dir / "results.json").write_text(json.dumps(results))
    return str(ckpt)


def test_a_requeued_job_finds_its_own_run_at_any_depth_and_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from metalight.run import config_dir
    from metalight.run.train import _requeued_checkpoint

    monkeypatch.chdir(tmp_path)
    mine = ["seed=1"]
    # A default sweep directory: the requeued job's sweep is a new runs/multirun/<time>.
    own = _stopped_run(tmp_path / "runs/multirun/2026-01-01_00-00-00/1", "77_1", 5, mine)
    # A search trial's subdirectory, another task of the array, a job that was not requeued,
    # and the same job's other sweep run (one allocation running several).
    _stopped_run(tmp_path / "runs/sweeps/study/2026-01-01_00-00-00_0", "77_2", 9, mine)
    _stopped_run(tmp_path / "runs/multirun/2026-01-01_00-00-00/0", "77_1", 9, ["seed=0"])
    _stopped_run(tmp_path / "runs/2026-01-01_00-00-00", "78", 9, None)
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", [*mine, "hydra.sweep.dir=elsewhere"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert _requeued_checkpoint(cfg, "77_1") == (own, Path(own).parents[1].resolve())
        assert _requeued_checkpoint(cfg, "79") is None
        # A later stop of the same job (its resume, stopped again) is the one to resume.
        later = _stopped_run(tmp_path / "runs/multirun/2026-01-01_01-00-00/1", "77_1", 8, mine)
        assert _requeued_checkpoint(cfg, "77_1") == (later, Path(later).parents[1].resolve())
    finally:
        HydraConfig.instance().cfg = None  # type: ignore[assignment]
