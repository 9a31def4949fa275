"""Model selection (callbacks=best): the test uses the weights of the best validation step,
training stops early on the same metric, and runs without validation say they test the last
weights."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from metalight.run import evaluate, format_summary, load_run_config, train
from tests.cli.conftest import TINY

# One meta-batch per epoch, so validation follows every meta-iteration; an outer learning rate
# far too large (for Adam, 0.1 moves every weight by about 0.1 per step) makes validation worse
# after its best point, which comes early. Seeded, so the trajectory is the same every time.
PEAKS_EARLY = [
    "+recipe=maml",
    "logger=csv",
    "callbacks=best",
    *TINY,
    "trainer.max_steps=8",
    "data.train_batches_per_epoch=1",
    "outer_optim.lr=0.1",
    "algorithm.eval_inner_steps=1",
    "callbacks.early_stopping.patience=2",
]


def _val_losses(metrics_csv: Path) -> dict[int, float]:
    """val/loss_post by meta-iteration (Lightning logs validation at step = global_step - 1)."""
    with metrics_csv.open() as file:
        rows = list(csv.DictReader(file))
    return {int(r["step"]) + 1: float(r["val/loss_post"]) for r in rows if r.get("val/loss_post")}


def test_the_best_validation_step_is_tested_not_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compose_train: Callable[..., DictConfig]
) -> None:
    monkeypatch.chdir(tmp_path)
    results = train(compose_train([*PEAKS_EARLY, f"paths.output_dir={tmp_path}"]))
    run_dir = Path(results["run_dir"])
    losses = _val_losses(run_dir / "logs" / "metrics.csv")
    best_step = min(losses, key=losses.__getitem__)
    selection = results["selection"]
    assert selection["weights"] == "best"
    assert (selection["metric"], selection["mode"]) == ("val/loss_post", "min")
    assert selection["step"] == best_step
    assert selection["score"] == pytest.approx(losses[best_step], rel=1e-6)
    assert Path(selection["checkpoint"]).name == f"best-step{best_step}.ckpt"
    # The construction holds: validation peaked early and got worse, so early stopping (after
    # 2 validations without improvement) ended training before max_steps.
    assert best_step < results["steps"] < 8
    assert selection["early_stopped_at"] == results["steps"] == best_step + 2
    assert json.loads((run_dir / "results.json").read_text())["selection"] == selection
    assert f"best val/loss_post (min) {selection['score']:.4g}" in format_summary(results)

    # The tested weights are the best checkpoint's: testing it again gives the same numbers,
    # testing the last weights does not.
    cfg, _ = load_run_config(selection["checkpoint"])
    best = evaluate(cfg, selection["checkpoint"])["metrics"]
    last = evaluate(cfg, run_dir / "checkpoints" / "last.ckpt")["metrics"]
    assert best["test/loss_post"] == results["metrics"]["test/loss_post"]
    assert best["test/loss_pre"] == results["metrics"]["test/loss_pre"]
    assert last["test/loss_post"] != results["metrics"]["test/loss_post"]


def test_without_validation_the_last_weights_are_tested_and_said_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compose_train: Callable[..., DictConfig]
) -> None:
    monkeypatch.chdir(tmp_path)
    results = train(
        compose_train(
            [
                "+recipe=maml",
                "logger=none",
                "callbacks=best",
                *TINY,
                "trainer.max_steps=2",
                "trainer.limit_val_batches=0",
                f"paths.output_dir={tmp_path}",
            ]
        )
    )
    selection = results["selection"]
    assert selection["weights"] == "last"
    assert selection["reason"] == "no validation in this run"
    assert "early_stopped_at" not in selection
    assert not list((Path(results["run_dir"]) / "checkpoints").glob("best*.ckpt"))
    assert "last weights (no validation in this run" in format_summary(results)


def test_auto_monitor_follows_the_data(compose_train: Callable[..., DictConfig]) -> None:
    from metalight.run.selection import resolve_monitor

    assert resolve_monitor(compose_train(["data=sinusoid"]), "auto", "auto") == (
        "val/loss_post",
        "min",
    )
    assert resolve_monitor(compose_train(["data=omniglot"]), "auto", "auto") == (
        "val/acc_post",
        "max",
    )
    assert resolve_monitor(compose_train([]), "val/acc_pre", "auto") == ("val/acc_pre", "max")


def test_a_search_metric_the_run_lacks_is_one_clear_line() -> None:
    from omegaconf import OmegaConf

    from metalight.run.errors import ConfigError
    from metalight.run.selection import objective

    cfg = OmegaConf.create({"optimized_metric": "val/acc_post"})
    assert objective(OmegaConf.create({}), {"metrics": {"test/loss_post": 1.0}}) is None
    with pytest.raises(ConfigError) as error:
        objective(cfg, {"metrics": {"test/loss_post": 1.0}})
    message = str(error.value)
    assert "\n" not in message
    assert "optimized_metric=val/acc_post was not produced by this run" in message
    assert "callbacks.best_checkpoint.monitor=val/acc_post" in message
