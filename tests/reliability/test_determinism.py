"""Same seed, same numbers: in-process runs of ``_train.py`` compared bitwise.

The runs use ``enable_determinism`` and ``Trainer(deterministic=True)``; the fixture puts the
process-wide settings they change back afterwards.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.reliability import _train
from tests.reliability._helpers import assert_identical, read_progress

STEPS = 30
# Resuming into the run's own checkpoint folder is the normal case, not a mistake.
pytestmark = pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")


@pytest.fixture
def isolated() -> Iterator[None]:
    """Restores what enable_determinism and Trainer(deterministic=True) change."""
    keys = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG")
    env = {k: os.environ.get(k) for k in keys}
    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    python_state, numpy_state = random.getstate(), np.random.get_state()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(threads)
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags[2:]
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def run(out: Path, *args: str, steps: int = STEPS, progress: str = "progress.txt") -> dict:
    return _train.train(
        ["--out", str(out), "--max-steps", str(steps), "--progress", str(out / progress), *args]
    )


def same(got: dict[str, Any], want: dict[str, Any]) -> None:
    for key in ("params", "optimizer", "scheduler", "test", "global_step"):
        assert_identical(got[key], want[key], key)


@pytest.mark.usefixtures("isolated")
def test_same_seed_gives_bitwise_identical_runs_whatever_the_workers(tmp_path: Path) -> None:
    one = run(tmp_path / "a")
    two = run(tmp_path / "b", "--num-workers", "2")
    same(two, one)
    assert read_progress(tmp_path / "a/progress.txt") == read_progress(tmp_path / "b/progress.txt")
    other = run(tmp_path / "c", "--seed", "1")
    assert not torch.equal(other["params"]["model.0.weight"], one["params"]["model.0.weight"])
    assert other["test"] != one["test"]


@pytest.mark.usefixtures("isolated")
def test_random_layers_resume_exactly_only_with_the_rng_callback(tmp_path: Path) -> None:
    """Dropout draws from the global generator, which Lightning does not checkpoint."""
    dropout = ["--dropout", "0.2"]
    want = run(tmp_path / "ref", *dropout)
    # Stop at step 13 (last checkpoint: step 10, mid-epoch) and resume in a fresh Trainer.
    for name, extra in (("with", ["--rng-callback"]), ("without", [])):
        out = tmp_path / name
        run(out, *dropout, *extra, steps=13)
        got = run(out, *dropout, *extra, "--resume", progress="resumed.txt")
        if extra:
            same(got, want)
        else:
            assert not torch.equal(
                got["params"]["model.head.weight"], want["params"]["model.head.weight"]
            )
            train, _ = read_progress(out / "resumed.txt")
            reference, _ = read_progress(tmp_path / "ref/progress.txt")
            assert min(train) == 11 and train[11] != reference[11]
