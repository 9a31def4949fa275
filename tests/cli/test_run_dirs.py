"""Run directories: two runs started in the same second never share one."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from metalight.run import resources


class _Frozen(datetime):
    @classmethod
    def now(cls, tz: object = None) -> _Frozen:  # type: ignore[override]
        return cls(2026, 1, 1, 12, 0, 0)


def test_runs_started_in_the_same_second_get_their_own_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resources, "datetime", _Frozen)
    resources.reset_run_dirs()
    try:
        first = Path(resources._reserved_run_dir(str(tmp_path)))
        # Another process (a fresh reservation) in the same second:
        resources.reset_run_dirs()
        second = Path(resources._reserved_run_dir(str(tmp_path)))
    finally:
        resources.reset_run_dirs()
    assert first.is_dir() and second.is_dir()
    assert (first.name, second.name) == ("2026-01-01_12-00-00", "2026-01-01_12-00-00_1")


def test_a_sweep_directory_is_only_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # OmegaConf evaluates a default hydra.sweep.dir that a config file overrides: naming it
    # must leave no folder behind.
    monkeypatch.setattr(resources, "datetime", _Frozen)
    resources.reset_run_dirs()
    try:
        named = Path(resources._reserved_run_dir(str(tmp_path / "multirun"), "name"))
    finally:
        resources.reset_run_dirs()
    assert named.name == "2026-01-01_12-00-00"
    assert not (tmp_path / "multirun").exists()
