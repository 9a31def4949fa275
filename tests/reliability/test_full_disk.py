"""A full disk, for real: the run writes into a small tmpfs mounted in a private mount
namespace (``unshare -m``; needs root, skipped where that is not permitted).

* Room for the run but not its pictures: the results and the summary are there, each
  missing picture costs one warning line, and the run succeeds.
* No room for a checkpoint: one line naming the file and the free space, exit 2, no
  traceback, no temporary file left, and the run directory (config, logs) kept.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability._helpers import ROOT, child_env

ARGS = [
    "train",
    "+recipe=maml",
    "trainer.max_steps=3",
    "data.meta_batch_size=4",
    "data.test_episodes=8",
    "data.val_episodes=4",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
]


def _can_mount(tmp: Path) -> str | None:
    """Why a private tmpfs cannot be mounted here (None: it can)."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return "needs Linux with unshare(1)"
    if os.geteuid() != 0:
        return "mounting a tmpfs in a private namespace needs root"
    probe = tmp / "probe"
    probe.mkdir()
    done = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(probe))}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return (
        None if done.returncode == 0 else f"unshare -m + mount not permitted: {done.stderr.strip()}"
    )


def run_on_small_disk(tmp_path: Path, size: str) -> tuple[int, str, str, list[Path]]:
    """Runs the command in a tmpfs of ``size``: (status, stdout, stderr, paths left on it).

    The tmpfs disappears with the namespace, so what the run left is listed (and results.json
    copied out) from inside it.
    """
    reason = _can_mount(tmp_path)
    if reason:
        pytest.skip(reason)
    disk = tmp_path / "disk"
    keep = tmp_path / "kept"
    disk.mkdir()
    keep.mkdir()
    command = shlex.join([sys.executable, "-m", "metalight.cli", *ARGS])
    d, k = shlex.quote(str(disk)), shlex.quote(str(keep))
    script = (
        f"mount -t tmpfs -o size={size} tmpfs {d} && cd {d} && {command}; status=$?; "
        f"find {d} -mindepth 1 > {k}/listing; cp {d}/runs/*/results.json {k}/ 2>/dev/null; "
        "exit $status"
    )
    env = {**child_env(), "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    listing = [Path(line) for line in (keep / "listing").read_text().splitlines()]
    return done.returncode, done.stdout, done.stderr, listing


def test_pictures_that_do_not_fit_cost_a_warning_not_the_results(tmp_path: Path) -> None:
    # Room for the config, the checkpoint, the logs, the results and the training curves
    # (about 130 KiB), not for the ~190 KiB picture of test tasks.
    status, out, err, left = run_on_small_disk(tmp_path, "224k")
    assert status == 0, err[-3000:]
    assert "Traceback" not in err
    assert "metalight train finished" in out and "95% CI over 8 tasks" in out
    (warning,) = [line for line in err.splitlines() if "warning" in line]
    assert warning.startswith("metalight: warning: could not draw ")
    assert "sinusoid_tasks.png (DiskFullError: no space left on the device writing " in warning
    assert " free there)" in warning and warning.endswith("the results are kept")
    names = {p.name for p in left}
    assert {"results.json", "last.ckpt", "training_curves.png", "metrics.csv"} <= names
    assert "sinusoid_tasks.png" not in names
    assert not [p for p in left if p.name.endswith(".tmp")], "a temporary file was left"
    results = json.loads((tmp_path / "kept" / "results.json").read_text())
    assert results["metrics"]["test/episodes"] == 8 and results["steps"] == 3
    assert "training_curves" in results["files"] and "sinusoid_tasks" not in results["files"]


def test_a_checkpoint_that_does_not_fit_gets_one_line_naming_it(tmp_path: Path) -> None:
    # Room for Hydra's files, the config and the logs, not for a ~45 KiB checkpoint.
    status, _, err, left = run_on_small_disk(tmp_path, "64k")
    assert status == 2, err[-3000:]
    assert "Traceback" not in err and "unexpected pos" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("metalight train: error:")]
    disk = tmp_path / "disk"
    assert f"no space left on the device writing {disk}/runs/" in line
    assert "/checkpoints/last.ckpt (" in line and " free there)" in line
    names = {p.name for p in left}
    assert {"config.yaml", ".hydra"} <= names, "the run directory of a run that trained is kept"
    assert not [p for p in left if p.name.endswith(".tmp") or p.suffix == ".ckpt"]
