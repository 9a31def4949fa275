"""Determinism and exact resume, with real processes and a real ``SIGKILL``.

Every run is ``python tests/reliability/_train.py``: MAML with learnable per-layer inner
rates, outer Adam and StepLR, sinusoid tasks, validation every epoch, checkpoints every 5
steps through ``AtomicCheckpointIO``. The reference run starts in the background while the
test kills and resumes another; everything is compared bitwise (``torch.equal``, ``==`` on
the float metrics and on the hex of every logged loss).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from tests.reliability._helpers import Run, assert_identical, read_progress, wait_until

BATCHES_PER_EPOCH = 13  # as in _train.py
STEPS = 60

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses SIGKILL")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The uninterrupted run, started in the background while the victim runs."""
    return Run(tmp_path_factory.mktemp("reference")).start()


def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(
    reference: Run, tmp_path: Path
) -> None:
    # The victim hangs after step 22 (its last checkpoint: step 20, 7 batches into epoch 1) and
    # is killed there, so steps 21 and 22 are lost and must be redone identically.
    victim = Run(tmp_path, ["--stall-at", "22"]).start()
    assert victim.proc is not None
    wait_until(lambda: 22 in victim.progress()[0], victim.proc, timeout=180, what="step 22")
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    assert victim.proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "result.pt").exists()

    # What the resume starts from: a checkpoint inside an epoch, older than the kill.
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    saved_step = checkpoint["global_step"]
    position = checkpoint["SinusoidDataModule"]
    killed_train, killed_val = victim.progress()
    assert saved_step == 20 and max(killed_train) == 22
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["epoch=1-step=20.ckpt", "last.ckpt"]
    # Mid-epoch, and the stream's settings, which a resume must match.
    assert position["epoch"] == 1 and position["next_batch"] == 20 - BATCHES_PER_EPOCH
    assert position["stream"]["train_batches_per_epoch"] == BATCHES_PER_EPOCH

    resumed = Run(tmp_path, ["--resume"], "resumed.txt").start()
    got = resumed.result()
    want = reference.result()
    assert got["global_step"] == want["global_step"] == STEPS
    assert_identical(got["params"], want["params"], "params")
    assert any(k.startswith("inner_lrs.") for k in want["params"])
    assert sorted(os.listdir(reference.out / "checkpoints")) == [
        "epoch=4-step=60.ckpt",
        "last.ckpt",
    ]
    assert_identical(got["optimizer"], want["optimizer"], "optimizer")
    assert_identical(got["scheduler"], want["scheduler"], "scheduler")
    assert_identical(got["test"], want["test"], "test metrics")

    # Step by step: the killed run, then the resumed one from the checkpoint's step on, logged
    # the very losses (and validation metrics) of the uninterrupted run.
    ref_train, ref_val = reference.progress()
    resumed_train, resumed_val = resumed.progress()
    assert sorted(resumed_train) == list(range(saved_step + 1, STEPS + 1))
    for step, line in [*killed_train.items(), *resumed_train.items()]:
        assert line == ref_train[step], f"step {step}"
    assert resumed_val and killed_val
    for step, line in [*killed_val.items(), *resumed_val.items()]:
        assert line == ref_val[step], f"validation after step {step}"


def test_progress_parser_ignores_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("1 0 0 0x1p+0\nval 1 val/loss=0x1p+0\n2 0 1 0x1.8")
    assert read_progress(path) == ({1: "0 0 0x1p+0"}, {1: "val/loss=0x1p+0"})
