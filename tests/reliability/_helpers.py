"""Starting, watching and comparing real training processes for the reliability tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TRAIN = HERE / "_train.py"


def child_env() -> dict[str, str]:
    """The environment of a child process: the checkout importable, one thread per op."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env.pop("CUBLAS_WORKSPACE_CONFIG", None)
    return env


@dataclass
class Run:
    """One ``_train.py`` process writing into ``out``."""

    out: Path
    args: list[str] = field(default_factory=list)
    progress_name: str = "progress.txt"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def progress_path(self) -> Path:
        return self.out / self.progress_name

    @property
    def log_path(self) -> Path:
        return self.out / f"{Path(self.progress_name).stem}.log"

    def start(self) -> Run:
        self.out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(TRAIN), "--out", str(self.out)]
        command += ["--progress", str(self.progress_path), *self.args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT
            )
        return self

    def wait(self, timeout: float = 240) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"{self.out} did not finish in {timeout} s:\n{self.log()}"
            ) from err
        assert self.proc.returncode == 0, f"{self.out} failed:\n{self.log()}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def result(self) -> dict[str, Any]:
        self.wait()
        return torch.load(self.out / "result.pt", weights_only=True)

    def progress(self) -> tuple[dict[int, str], dict[int, str]]:
        return read_progress(self.progress_path)


def read_progress(path: Path) -> tuple[dict[int, str], dict[int, str]]:
    """``({step: "epoch batch loss"}, {step: "val metrics"})`` from a progress file.

    Only complete lines count: a killed process may leave a partial last line.
    """
    train: dict[int, str] = {}
    val: dict[int, str] = {}
    if not path.exists():
        return train, val
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        fields = line.split(maxsplit=2)
        if fields[0] == "val":
            val[int(fields[1])] = fields[2].strip()
        else:
            train[int(fields[0])] = " ".join(fields[1:]).strip()
    return train, val


def wait_until(
    condition: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float, what: str
) -> None:
    """Polls ``condition`` every 5 ms; fails if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process exited (rc={proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def assert_identical(got: Any, want: Any, where: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and numbers (zero tolerance)."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got).__name__} is not a tensor"
        assert got.dtype == want.dtype and got.shape == want.shape, f"{where}: dtype/shape differ"
        assert torch.equal(got, want), (
            f"{where}: differs (max abs diff {(got.double() - want.double()).abs().max().item()})"
        )
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (
            f"{where}: keys differ: {sorted(map(str, got))} vs {sorted(map(str, want))}"
        )
        for key in want:
            assert_identical(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, list | tuple):
        assert isinstance(got, list | tuple) and len(got) == len(want), f"{where}: lengths differ"
        for i, (a, b) in enumerate(zip(got, want)):
            assert_identical(a, b, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def start_cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, name: str = "cli"
) -> subprocess.Popen[bytes]:
    """Starts ``python -m metalight.cli ARGS`` in ``cwd``, its output in ``cwd/NAME.out/.err``."""
    cwd.mkdir(parents=True, exist_ok=True)
    full_env = {**child_env(), **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    with open(cwd / f"{name}.out", "wb") as out, open(cwd / f"{name}.err", "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "metalight.cli", *args],
            cwd=cwd,
            env=full_env,
            stdout=out,
            stderr=err,
        )


def finish_cli(proc: subprocess.Popen[bytes], cwd: Path, name: str = "cli") -> tuple[int, str, str]:
    """Waits for a :func:`start_cli` process: ``(exit status, stdout, stderr)``."""
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    out = (cwd / f"{name}.out").read_text(errors="replace")
    err = (cwd / f"{name}.err").read_text(errors="replace")
    return proc.returncode, out, err
