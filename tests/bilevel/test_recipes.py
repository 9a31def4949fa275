"""``metalight train +recipe=hyper_lr|reweight|distill`` with tiny budgets: the real command
path (Hydra composition, ``_target_`` building, Lightning fit and test), the method and its
baseline side by side in results.json and in the summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from metalight.bilevel import Distill, HyperLR, Reweight
from metalight.cli import main
from metalight.run import config_dir, register_recipes, register_resolvers, train

pytest.importorskip("sklearn", reason="the digits data ships with scikit-learn")

TINY = [
    "trainer.max_steps=3",
    "algorithm.inner_steps=4",
    "data.train_batches_per_epoch=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
]


@pytest.mark.parametrize(
    ("recipe", "kind", "extra"),
    [
        ("hyper_lr", HyperLR, ["algorithm.baseline_lrs=[0.1,1.0]"]),
        ("reweight", Reweight, []),
        ("distill", Distill, ["algorithm.eval_models=3", "algorithm.baseline_lrs=[0.3]"]),
    ],
)
def test_recipe_reports_method_and_baseline(
    recipe: str, kind: type, extra: list[str], tmp_path: Path
) -> None:
    register_resolvers()
    register_recipes()
    overrides = [f"+recipe={recipe}", f"paths.run_dir={tmp_path}", *TINY, *extra]
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    results = train(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["steps"] == 3 and saved["recipe"] == recipe
    for section in ("metrics", "baseline"):
        acc = saved[section]["test/acc_post"]
        assert 0.0 <= acc <= 1.0 and saved[section]["test/acc_post_ci95"] > 0
        assert not any(key.startswith("baseline/") for key in saved[section])
    assert saved["baseline"] == results["baseline"]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert checkpoint["bilevel_inner"]["optimizer"] == "sgd"
    assert saved["algorithm"] == kind.__name__
    if recipe == "hyper_lr":
        # Logged metrics are float32.
        assert saved["baseline"]["test/lr"] in (torch.tensor(0.1).item(), 1.0)
        assert saved["baseline"]["test/inner_steps"] == 3 * 4
        assert checkpoint["bilevel_inner"]["age"] == 3
    if recipe == "reweight":
        # The noisy-label data: the learned weights are reported on flipped and clean labels.
        assert {"test/weight_flipped", "test/weight_clean"} <= set(saved["metrics"])
    if recipe == "distill":
        assert (tmp_path / "distilled_images.png").stat().st_size > 0
        assert saved["metrics"]["test/models"] == saved["baseline"]["test/models"] == 3
        assert checkpoint["bilevel_inner"]["age"] == 1  # restarted every outer step


def test_the_command_prints_the_baseline_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["train", "+recipe=reweight", *TINY, "data.noise=0.4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    test_line = next(line for line in out.splitlines() if line.startswith("  test "))
    baseline_line = next(line for line in out.splitlines() if line.startswith("  baseline "))
    assert "accuracy" in test_line and "95% CI" in test_line
    assert "accuracy" in baseline_line and "95% CI" in baseline_line
