"""A wheel built from this checkout installs into a fresh virtual environment and the
``metalight`` command works from any directory, with configs and recipes inside the
package and no generic top-level package (``configs``, ``recipes``) in site-packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import REPO, TINY, only_run_dir


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_wheel_install_runs_the_command_from_any_directory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    dist = tmp_path / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(REPO),
        ],
        tmp_path,
        env,
    )
    (wheel,) = dist.glob("metalight-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path, env)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    _run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", str(wheel)],
        tmp_path,
        env,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(
        [
            str(python),
            "-c",
            "import metalight, sysconfig; "
            "print(metalight.__file__); print(sysconfig.get_paths()['purelib'])",
        ],
        elsewhere,
        env,
    ).stdout.split()
    package, site = Path(where[0]).parent, Path(where[1])
    assert package == site / "metalight", "the installed wheel is not the metalight imported"
    assert (package / "configs" / "train.yaml").is_file()
    assert (package / "recipes" / "maml.yaml").is_file()
    assert not (site / "configs").exists() and not (site / "recipes").exists()

    command = str(bin_dir / "metalight")
    assert "maml" in _run([command, "recipes"], elsewhere, env).stdout
    assert "recipe: anil" in _run([command, "train", "--help"], elsewhere, env).stdout
    done = _run([command, "train", "+recipe=maml", *TINY], elsewhere, env)
    assert "metalight train finished" in done.stdout
    run_dir = only_run_dir(elsewhere / "runs")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 3 and "test/loss_post" in results["metrics"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
