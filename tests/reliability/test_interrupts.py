"""SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) save the step in progress, write
what the run has, print the resume command and exit 143 / 130; the resume then finishes
bitwise as the uninterrupted run does. Every run is the real ``metalight train`` process.

The signal is sent by the process itself, through the test hook ``METALIGHT_TEST_SIGNAL_AT_STEP``
(``STEP[:SIGNAL]``: the signal arrives while meta-iteration STEP trains), at a step drawn at
random (printed in every failure), always before the first periodic checkpoint (every 100).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import sys
import time
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
]
SEED = int(time.time())
STOPS = dict(zip(("SIGTERM", "SIGINT"), random.Random(SEED).sample(range(1, STEPS), 2)))


def the_run(parent: Path) -> Path:
    (run,) = [p for p in (parent / "runs").iterdir() if p.is_dir()]
    return run


def final_state(run_dir: Path) -> dict:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return {k: checkpoint[k] for k in ("global_step", "state_dict", "optimizer_states")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int, str, str]]:
    """The uninterrupted run and one run stopped by each signal, started side by side."""
    started = {}
    for name in ("reference", *STOPS):
        cwd = tmp_path_factory.mktemp(name)
        env = {SIGNAL_AT_STEP_ENV: f"{STOPS[name]}:{name}"} if name in STOPS else {}
        started[name] = (cwd, start_cli(ARGS, cwd, env))
    done = {}
    for name, (cwd, proc) in started.items():
        done[name] = (cwd, *finish_cli(proc, cwd))
    return done


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_saves_the_step_and_the_resume_ends_bitwise_as_the_uninterrupted_run(
    runs: dict[str, tuple[Path, int, str, str]], name: str, code: int
) -> None:
    where = f"{name} while training step {STOPS[name]} (seed {SEED})"
    cwd, status, out, err = runs[name]
    assert status == code, f"{where}: exit {status}\n{err[-3000:]}"
    assert "Traceback" not in err, where
    run_dir = the_run(cwd)
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
    assert f"resume with: {resume}" in err and f"resume    {resume}" in out
    assert not (run_dir / "sinusoid_tasks.png").exists()

    resumed = start_cli([*shlex.split(resume)[1:]], cwd / "resume")
    status, out, err = finish_cli(resumed, cwd / "resume")
    assert status == 0, f"{where}: resume failed\n{err[-3000:]}"
    done = STEPS - STOPS[name]
    plural = "" if done == 1 else "s"
    assert f"trained   {done} meta-iteration{plural} in " in out
    assert f"(resumed at {STOPS[name]}: {STEPS} in total)" in out
    resumed_dir = the_run(cwd / "resume")
    reference = the_run(runs["reference"][0])
    assert runs["reference"][1] == 0, runs["reference"][3][-3000:]
    assert_identical(final_state(resumed_dir), final_state(reference), where)
    got = json.loads((resumed_dir / "results.json").read_text())
    want = json.loads((reference / "results.json").read_text())
    assert got["metrics"] == want["metrics"], where
    assert (
        got["steps"] == STEPS and got["steps_this_run"] == done and got["start_step"] == STOPS[name]
    )


def test_a_signal_before_the_first_step_saves_nothing_and_says_how_to_start_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv(SIGNAL_AT_STEP_ENV, "0")
    before = signal.getsignal(signal.SIGTERM)
    assert main(ARGS) == 143
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are given back
    run_dir = the_run(tmp_path)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["interrupted"]["step"] == 0 and results["interrupted"]["checkpoint"] is None
    assert results["interrupted"]["resume"] == shlex.join(["metalight", *ARGS])
    assert not list(run_dir.glob("checkpoints/*.ckpt"))
    assert "nothing to save yet" in capsys.readouterr().out


def test_trainer_slurm_requeues_itself_and_the_requeued_job_resumes_bitwise(
    runs: dict[str, tuple[Path, int, str, str]], tmp_path: Path
) -> None:
    # SLURM is not here: a stand-in scontrol records the requeue. Everything else is real:
    # Lightning's SLURMEnvironment(auto_requeue=True), the signal, the save and the resume.
    stop = random.Random(SEED + 1).randrange(1, STEPS)
    where = f"SIGUSR1 while training step {stop} (seed {SEED})"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "meta",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    args = [*ARGS, "trainer=slurm"]
    first = start_cli(args, tmp_path, {**slurm, SIGNAL_AT_STEP_ENV: f"{stop}:SIGUSR1"}, "first")
    status, _, err = finish_cli(first, tmp_path, "first")
    assert status == 128 + signal.SIGUSR1, f"{where}: exit {status}\n{err[-3000:]}"
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    (stopped,) = (tmp_path / "runs").iterdir()
    results = json.loads((stopped / "results.json").read_text())
    assert results["slurm_job_id"] == "4242" and results["interrupted"]["requeued"] is True
    assert results["interrupted"]["requeue"] == "requeued SLURM job 4242"

    # The requeued job: the same command and job id, and no ckpt_path.
    second = start_cli(args, tmp_path, slurm, "second")
    status, out, err = finish_cli(second, tmp_path, "second")
    assert status == 0, f"{where}: requeued run failed\n{err[-3000:]}"
    assert f"SLURM job 4242 was requeued: resuming from {stopped}/checkpoints/last.ckpt" in out
    (resumed,) = [p for p in (tmp_path / "runs").iterdir() if p != stopped]
    reference = the_run(runs["reference"][0])
    assert_identical(final_state(resumed), final_state(reference), where)
    got = json.loads((resumed / "results.json").read_text())
    assert got["metrics"] == json.loads((reference / "results.json").read_text())["metrics"]
    assert got["start_step"] == stop and got["steps"] == STEPS
