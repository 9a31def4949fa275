"""Helpers for the command-line tests: composing configs and running the real command."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from metalight.run import config_dir, register_recipes, register_resolvers
from tests.conftest import OMNIGLOT_DIR, REPO, SMALL_SETS

__all__ = ["OMNIGLOT_DIR", "REPO", "SMALL_SETS", "TINY", "only_run_dir", "run_cli"]

# Tiny budgets: seconds, not minutes.
TINY = [
    "trainer.max_steps=3",
    "data.meta_batch_size=4",
    "data.test_episodes=8",
    "data.val_episodes=4",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture
def compose_train() -> Callable[..., DictConfig]:
    """``compose_train(overrides)``: the composed ``train`` config, as the command builds it."""
    register_resolvers()
    register_recipes()

    def _compose(overrides: Sequence[str] = ()) -> DictConfig:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            return compose("train", overrides=list(overrides))

    return _compose


def run_cli(
    args: Sequence[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m metalight.cli ARGS`` in ``cwd`` and return the finished process."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p
    )
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "metalight.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def only_run_dir(parent: Path) -> Path:
    """The single run directory under ``parent`` (fails if there is not exactly one)."""
    runs = [p for p in parent.iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one run directory in {parent}, found {runs}"
    return runs[0]
