"""Exact resume of a bilevel run after a real ``SIGKILL``.

``tests/bilevel/_train.py`` runs HyperLR over inner SGD with momentum, truncated and
checkpointed unrolls and random restarts every 4 outer steps. The uninterrupted reference
runs in the background while another run is killed after step 12 (its last checkpoint:
step 10, mid-epoch and mid-way between two restarts) and resumed. Everything is compared
bitwise: meta-parameters, the inner weights and momentum in progress, the outer optimizer and
scheduler, the test metrics and every logged outer loss.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.reliability._helpers import assert_identical, child_env, read_progress, wait_until

pytest.importorskip("sklearn", reason="the digits data ships with scikit-learn")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses SIGKILL")

SCRIPT = Path(__file__).resolve().parent / "_train.py"
ROOT = Path(__file__).resolve().parents[2]
STEPS = 16


def _start(out: Path, *args: str, progress: str = "progress.txt") -> subprocess.Popen[bytes]:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--progress", str(out / progress)]
    with open(out / f"{progress}.log", "wb") as log:
        return subprocess.Popen(
            [*command, *args], stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT
        )


def _result(proc: subprocess.Popen[bytes], out: Path, log: str) -> dict:
    try:
        proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    text = (out / log).read_text(errors="replace")[-4000:]
    assert proc.returncode == 0, f"{out} failed:\n{text}"
    return torch.load(out / "result.pt", weights_only=True)


def test_sigkill_then_resume_equals_the_uninterrupted_bilevel_run(tmp_path: Path) -> None:
    reference_dir = tmp_path / "reference"
    reference = _start(reference_dir, "--max-steps", str(STEPS))
    victim_dir = tmp_path / "victim"
    victim = _start(victim_dir, "--max-steps", str(STEPS), "--stall-at", "12")
    wait_until(lambda: 12 in read_progress(victim_dir / "progress.txt")[0], victim, 180, "step 12")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (victim_dir / "result.pt").exists()

    checkpoint = torch.load(victim_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 10
    saved_inner = checkpoint["bilevel_inner"]
    # Two outer steps into a restart cycle (8, 9 | 10 ...), with momentum under way.
    assert saved_inner["age"] == 2
    assert all(b is not None for b in saved_inner["state"]["momentum_buffer"])

    resumed = _start(victim_dir, "--max-steps", str(STEPS), "--resume", progress="resumed.txt")
    got = _result(resumed, victim_dir, "resumed.txt.log")
    want = _result(reference, reference_dir, "progress.txt.log")
    assert got["global_step"] == want["global_step"] == STEPS
    assert_identical(got["params"], want["params"], "params")
    assert_identical(got["inner"], want["inner"], "inner training")
    assert_identical(got["optimizer"], want["optimizer"], "optimizer")
    assert_identical(got["scheduler"], want["scheduler"], "scheduler")
    assert_identical(got["test"], want["test"], "test metrics")

    ref_train, ref_val = read_progress(reference_dir / "progress.txt")
    killed_train, _ = read_progress(victim_dir / "progress.txt")
    resumed_train, resumed_val = read_progress(victim_dir / "resumed.txt")
    assert sorted(resumed_train) == list(range(11, STEPS + 1))
    for step, line in [*killed_train.items(), *resumed_train.items()]:
        assert line == ref_train[step], f"step {step}"
    assert resumed_val
    for step, line in resumed_val.items():
        assert line == ref_val[step], f"validation after step {step}"
