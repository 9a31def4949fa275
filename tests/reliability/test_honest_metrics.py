"""The command's headline never hides a diverged test episode (``nan_policy="off"``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from metalight.cli import main

RUN = [
    "train",
    "+recipe=maml",
    "trainer.max_steps=2",
    "data.meta_batch_size=2",
    "data.val_episodes=2",
    "data.test_episodes=20",
    "logger=none",
    "callbacks=none",
    "algorithm.nan_policy=off",
    "paths.output_dir=runs",
]


@pytest.mark.parametrize(
    ("inner_lr", "diverged"),
    # At lr 0.3 ten inner steps diverge on the five largest-amplitude test tasks; at 3.0 on
    # every one (which used to crash the metric's logging).
    [(0.3, 5), (3.0, 20)],
)
def test_diverged_episodes_are_counted_in_results_and_said_in_the_summary(
    inner_lr: float,
    diverged: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    code = main([*RUN, f"inner_optim.lr={inner_lr}"])
    out, err = capsys.readouterr()
    assert code == 0, f"exit status {code}\n{out}\n{err}"
    (path,) = (tmp_path / "runs").rglob("results.json")
    metrics = json.loads(path.read_text())["metrics"]
    assert metrics["test/diverged"] == diverged
    assert metrics["test/episodes_total"] == 20
    assert metrics["test/episodes"] == 20 - diverged
    (line,) = [line for line in out.splitlines() if line.lstrip().startswith("test ")]
    assert f"DIVERGED: {diverged} of 20 episodes" in line, line
    if diverged < 20:
        assert math.isfinite(metrics["test/loss_post"])
        assert f"over {20 - diverged} tasks" in line, line
    else:
        assert math.isnan(metrics["test/loss_post"])
