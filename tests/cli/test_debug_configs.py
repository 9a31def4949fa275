"""Debugging configs: debug=fdr, debug=overfit, debug=profiler, in real tiny runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from metalight.run import train
from tests.cli.conftest import TINY


class BatchSpy(Callback):
    """Keeps the support inputs of every training meta-batch (built by the config)."""

    seen: ClassVar[list[torch.Tensor]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        BatchSpy.seen.append(batch.support_x.detach().clone())


SPY = f"+callbacks.spy._target_={__name__}.BatchSpy"


@pytest.fixture
def run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compose_train: Callable[..., DictConfig]
) -> Callable[..., dict[str, Any]]:
    monkeypatch.chdir(tmp_path)
    BatchSpy.seen.clear()

    def _run(*overrides: str) -> dict[str, Any]:
        cfg = compose_train(["+recipe=maml", "logger=csv", *TINY, *overrides])
        return train(cfg)

    return _run


def test_fast_dev_run_does_one_meta_batch_of_each_stage(run: Callable[..., dict[str, Any]]) -> None:
    results = run("debug=fdr", "trainer.max_steps=50")
    assert results["steps"] == 1
    # One test meta-batch (data.eval_meta_batch_size episodes), not data.test_episodes=8.
    assert 0 < results["metrics"]["test/episodes"] < 8
    assert "metrics_csv" not in results["files"]  # Lightning logs nothing in a dev run


def test_overfit_trains_on_one_meta_batch(run: Callable[..., dict[str, Any]]) -> None:
    run("debug=overfit", "trainer.max_steps=3", SPY)
    first, *rest = BatchSpy.seen
    assert len(rest) == 2
    for batch in rest:
        assert torch.equal(batch, first)
    # Without it, every meta-iteration draws new tasks (so the check above can fail).
    BatchSpy.seen.clear()
    run("trainer.max_steps=2", "trainer.limit_val_batches=0", SPY)
    assert not torch.equal(BatchSpy.seen[0], BatchSpy.seen[1])


def test_profiler_writes_its_report_into_the_run_directory(
    run: Callable[..., dict[str, Any]],
) -> None:
    results = run("debug=profiler", "trainer.max_steps=2")
    report = (Path(results["run_dir"]) / "fit-profile.txt").read_text()
    assert "run_training_batch" in report
    assert (Path(results["run_dir"]) / "test-profile.txt").is_file()
