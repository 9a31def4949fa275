"""Determinism and exact resume, with real processes and a real ``SIGKILL``.

Every run is ``python tests/reliability/_train.py``: MAML with learnable per-layer inner
rates, outer Adam and StepLR, sinusoid tasks, validation every epoch, checkpoints every 5
steps through ``AtomicCheckpointIO``. The reference run starts in the background while the
test kills and resumes another; everything is compared bitwise (``torch.equal``, ``==`` on
the float metrics and on the hex of every logged loss).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from metalight.cli import main
from tests.reliability._helpers import Run, assert_identical, read_progress, wait_until

Capture = pytest.CaptureFixture[str]
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


# --- Resuming and evaluating through the real command: refusals in one line, exit 2 -----------

TINY = [
    "+recipe=maml",
    "trainer.max_steps=3",
    "data.meta_batch_size=4",
    "data.test_episodes=8",
    "data.val_episodes=4",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def _main_in(cwd: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> int:
    cwd.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    return main(argv)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run of ``metalight train +recipe=maml`` (in this process): its run directory."""
    cwd = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert _main_in(cwd, monkeypatch, ["train", *TINY]) == 0
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir


def _refused(
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    trained: Path,
) -> str:
    """Runs a command that must be refused: exit 2, one line, nothing written or changed."""
    before = _snapshot(trained)
    capsys.readouterr()
    assert _main_in(tmp_path, monkeypatch, argv) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("metalight ")]
    assert "Traceback" not in err, err
    assert _snapshot(trained) == before
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "a refused run left a run directory"
    assert not (trained / "eval").exists()
    return line


@pytest.mark.parametrize(
    ("overrides", "listing"),
    [
        (["outer_optim.lr=0.5"], "outer_optim.lr=0.001 there, 0.5 here"),
        (
            ["outer_optim=sgd"],
            "outer_optim._target_='torch.optim.Adam' there, 'torch.optim.SGD' here",
        ),
        (["model.hidden=[20,20]"], "model.hidden=[40, 40] there, [20, 20] here"),
        (
            ["algorithm=fomaml"],
            "algorithm._target_='metalight.algorithms.MAML' there, "
            "'metalight.algorithms.FOMAML' here",
        ),
        (["algorithm.learn_inner_lr=scalar"], "algorithm.learn_inner_lr=None there, 'scalar'"),
    ],
)
def test_a_resume_that_changes_what_the_checkpoint_restores_is_refused(
    trained: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    overrides: list[str],
    listing: str,
) -> None:
    ckpt = trained / "checkpoints" / "last.ckpt"
    argv = ["train", *TINY, "trainer.max_steps=5", *overrides, f"ckpt_path={ckpt}"]
    line = _refused(argv, tmp_path, monkeypatch, capsys, trained)
    assert line.startswith(f"metalight train: error: ckpt_path={ckpt} restores settings ")
    assert listing in line
    assert "leave these overrides out to resume" in line


def test_the_check_travels_with_the_checkpoint(
    trained: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Moved away from its run directory (no config.yaml beside it): still refused.
    moved = tmp_path / "moved" / "last.ckpt"
    moved.parent.mkdir()
    shutil.copy(trained / "checkpoints" / "last.ckpt", moved)
    argv = ["train", *TINY, "outer_optim.lr=0.5", f"ckpt_path={moved}"]
    line = _refused(argv, tmp_path / "cwd", monkeypatch, capsys, trained)
    assert f"restores settings this run changes (ckpt_path={moved})" in line
    assert "outer_optim.lr=0.001 there, 0.5 here" in line


def test_an_unchanged_resume_records_what_ran(
    trained: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = trained / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    argv = ["train", *TINY, "trainer.max_steps=5", f"ckpt_path={ckpt}"]
    assert _main_in(tmp_path, monkeypatch, argv) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "trained   2 meta-iterations in " in capsys.readouterr().out
    saved = OmegaConf.load(run_dir / "config.yaml")
    restored = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    (group,) = restored["optimizer_states"][0]["param_groups"]
    assert saved.outer_optim.lr == group["lr"] == 0.001 and saved.ckpt_path == str(ckpt)
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["steps"], results["steps_this_run"], results["start_step"]) == (5, 2, 3)


def _damaged_copy(trained: Path, tmp_path: Path, how: str) -> Path:
    """A copy of the trained run whose last.ckpt is damaged ``how``."""
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    ckpt = copy / "checkpoints" / "last.ckpt"
    if how == "bit rot":
        with zipfile.ZipFile(ckpt) as archive:
            info = next(i for i in archive.infolist() if "/data/" in i.filename)
        blob = bytearray(ckpt.read_bytes())
        name_len = int.from_bytes(blob[info.header_offset + 26 : info.header_offset + 28], "little")
        extra_len = int.from_bytes(
            blob[info.header_offset + 28 : info.header_offset + 30], "little"
        )
        blob[info.header_offset + 30 + name_len + extra_len] ^= 0x10
        ckpt.write_bytes(bytes(blob))
    elif how == "another zip":
        ckpt.unlink()
        with zipfile.ZipFile(ckpt, "w") as archive:
            archive.writestr("photos/cat.jpg", b"\xff\xd8")
    elif how == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    return ckpt


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("bit rot", "is damaged: archive/data/"),
        ("another zip", "is a zip archive but not a torch.save checkpoint"),
        ("truncated", "(1000 bytes) is truncated or is not a checkpoint"),
        ("directory", "is a directory, not a checkpoint file; give a .ckpt file in it"),
    ],
)
def test_a_damaged_checkpoint_or_a_directory_gets_one_line(
    trained: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    how: str,
    message: str,
) -> None:
    ckpt = trained / "checkpoints" if how == "directory" else _damaged_copy(trained, tmp_path, how)
    argv = [command, f"ckpt_path={ckpt}"] + (TINY if command == "train" else [])
    line = _refused(argv, tmp_path / "cwd", monkeypatch, capsys, trained)
    assert line.startswith(f"metalight {command}: error: ")
    assert message in line and "weights_only" not in line
    if how == "bit rot":
        assert "fails its CRC-32 checksum" in line


def test_eval_of_a_checkpoint_that_does_not_fit_gets_one_line(
    trained: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = trained / "checkpoints" / "last.ckpt"
    argv = ["eval", f"ckpt_path={ckpt}", "model.hidden=[20,20]"]
    line = _refused(argv, tmp_path, monkeypatch, capsys, trained)
    assert f"the weights in {ckpt} do not fit the model" in line
    assert "size mismatch for model." in line


def test_an_existing_run_directory_is_refused_before_anything_is_written(
    trained: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["train", *TINY, f"hydra.run.dir={trained}"]
    line = _refused(argv, tmp_path, monkeypatch, capsys, trained)
    assert f"run directory {trained} already holds a run" in line


def test_a_failed_start_removes_only_the_run_directory_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = "algorithm.inner_steps=abc"
    # The default directory, made for this run: removed.
    assert _main_in(tmp_path, monkeypatch, ["train", *TINY, bad]) == 2
    assert not any((tmp_path / "runs").iterdir())
    # A new directory given with hydra.run.dir: removed too.
    assert _main_in(tmp_path, monkeypatch, ["train", *TINY, bad, "hydra.run.dir=new"]) == 2
    assert not (tmp_path / "new").exists()
    # An existing (empty) one given by the user is kept, with Hydra's files only.
    (tmp_path / "mine").mkdir()
    assert _main_in(tmp_path, monkeypatch, ["train", *TINY, bad, "hydra.run.dir=mine"]) == 2
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == [".hydra", "train.log"]
    # A refusal that comes from inside the trainer (the task stream of another seed).
    assert "algorithm.inner_steps must be" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:skipping ")
def test_pictures_honour_nan_policy_skip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Inner steps this large diverge on some test tasks within 30 steps: test and training
    # skip those, and so must the picture of test tasks.
    argv = [
        "train",
        *TINY,
        "algorithm.nan_policy=skip",
        "inner_optim.lr=0.3",
        "algorithm.eval_inner_steps=30",
    ]
    assert _main_in(tmp_path, monkeypatch, argv) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "warning" not in capsys.readouterr().err
    assert (run_dir / "sinusoid_tasks.png").read_bytes().startswith(b"\x89PNG")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["files"]["sinusoid_tasks"] == str(run_dir / "sinusoid_tasks.png")
    assert results["metrics"]["test/episodes"] < 8  # some test tasks were indeed skipped


def test_resuming_weights_that_do_not_fit_gets_one_line_without_any_record_to_compare(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Capture
) -> None:
    # A checkpoint without the stored settings (saved by another program) and no config.yaml
    # beside it: the model itself says that the weights do not fit.
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    del checkpoint["callbacks"]["metalight.run_config"]
    foreign = tmp_path / "foreign" / "weights.ckpt"
    foreign.parent.mkdir()
    torch.save(checkpoint, foreign)
    argv = ["train", *TINY, "model.hidden=[20,20]", f"ckpt_path={foreign}"]
    line = _refused(argv, tmp_path / "cwd", monkeypatch, capsys, trained)
    assert f"the weights in ckpt_path={foreign} do not fit the model this run builds: " in line
    assert "size mismatch for model." in line
