"""``metalight eval`` of runs that are not few-shot episodes with held-out classes: a run
trained on every class (one line saying what to evaluate it on) and a bilevel run (its
baseline apart from the method, the summary telling its data and inner training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from metalight.cli import main
from tests.cli.conftest import only_run_dir

ONE_STEP = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def test_eval_of_a_run_trained_on_every_class_says_what_to_evaluate_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    for c in range(2):
        for i in range(2):
            path = tmp_path / "data" / f"class_{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (100 * c, 10 * i, 50)).save(path)
    train = ["train", "data=image_folder", "model=conv4", "model.in_channels=3"]
    train += ["data.train_root=data", "data.val_root=null", "data.test_root=null"]
    train += ["data.ways=2", "data.shots=1", "data.queries=1", "data.image_size=16"]
    train += ["data.meta_batch_size=1", "trainer.max_steps=1", "logger=none", *ONE_STEP]
    assert main(train) == 0
    ckpt = only_run_dir(tmp_path / "runs") / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert main(["eval", f"ckpt_path={ckpt}"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"metalight eval: error: the run of {ckpt} trained on every class of its data, so "
        "there are no held-out test classes to evaluate on: score fixed episodes with "
        f"`metalight eval ckpt_path={ckpt} data=episodes data.root=DIR` "
        "(DIR/<episode>/support|query/<class>/<image>), or give a folder of classes it did "
        "not train on with data.test_root=DIR\n"
    )
    assert not (ckpt.parents[1] / "eval").exists()  # refused before anything is written


def test_a_bilevel_run_is_summarised_as_what_it_trained_and_eval_keeps_the_baseline_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("sklearn", reason="the digits data ships with scikit-learn")
    monkeypatch.chdir(tmp_path)
    train = ["train", "+recipe=hyper_lr", "trainer.max_steps=3", "algorithm.inner_steps=4"]
    train += ["data.train_batches_per_epoch=2", "algorithm.baseline_lrs=[0.1]", "logger=none"]
    assert main([*train, *ONE_STEP]) == 0
    out = capsys.readouterr().out
    data = "digits, 1097 training / 300 validation / 400 test examples, batches of 32"
    assert f"  data      {data}\n" in out
    # Online: the inner training carried over 3 outer steps of 4 inner steps each, and the
    # baseline trained as long.
    test_line = next(line for line in out.splitlines() if line.startswith("  test "))
    baseline_line = next(line for line in out.splitlines() if line.startswith("  baseline "))
    assert test_line.startswith("  test      accuracy after 12 steps "), test_line
    assert baseline_line.startswith("  baseline  accuracy after 12 steps "), baseline_line
    run_dir = only_run_dir(tmp_path / "runs")
    trained = json.loads((run_dir / "results.json").read_text())
    assert trained["eval_inner_steps"] == 12

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert main(["eval", f"ckpt_path={ckpt}"]) == 0
    out = capsys.readouterr().out
    assert f"  data      {data}\n" in out
    assert test_line in out and baseline_line in out  # the same weights, the same numbers
    evaluated = json.loads((only_run_dir(run_dir / "eval") / "results.json").read_text())
    assert evaluated["metrics"] == trained["metrics"]
    assert evaluated["baseline"] == trained["baseline"]
    assert not any(key.startswith("baseline/") for key in evaluated["metrics"])
    assert evaluated["eval_inner_steps"] == 12


def test_noisy_digits_say_how_many_labels_are_flipped() -> None:
    from metalight.run.summary import describe_data

    data = {"_target_": "metalight.data.digits.NoisyDigitsDataModule", "noise": 0.4}
    data |= {"train_size": 1097, "val_size": 300, "test_size": 400, "batch_size": 32}
    assert describe_data(data) == (
        "digits, 1097 training / 300 validation / 400 test examples, batches of 32, "
        "40% of training labels flipped"
    )
