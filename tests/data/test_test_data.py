"""The test data itself: the synthetic Omniglot is what the tests assume, and missing real
data skips locally but fails in CI."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from metalight.data import Omniglot
from tests.conftest import (
    SMALL_SETS,
    SYNTHETIC_ALPHABETS,
    SYNTHETIC_CLASSES,
    missing_real_omniglot,
    require_data,
)


def test_synthetic_small_sets_read_as_the_real_layout(synthetic_omniglot: Omniglot) -> None:
    data = synthetic_omniglot
    # Greek and Latin are in both sets and must count once, as in the real small sets.
    assert SYNTHETIC_CLASSES == data.num_classes == 26
    assert Counter(data.class_alphabets) == {
        "Balinese": 3,
        "Early_Aramaic": 3,
        "Greek": 3,
        "Japanese_(katakana)": 4,
        "Korean": 4,
        "Latin": 3,
        "Sanskrit": 4,
        "Tagalog": 2,
    }
    assert set(SYNTHETIC_ALPHABETS) == set(SMALL_SETS)
    assert data.class_sizes.tolist() == [20] * 26
    assert data.data.shape == (520, 1, 28, 28) and data.data.dtype == torch.uint8
    # Strokes are drawn, inverted to high values, on an empty background.
    assert data.data.amax() == 255 and (data.data == 0).float().mean() > 0.5
    # Every image differs, so the sampler tests can tell which class an image came from.
    assert len(torch.unique(data.data.flatten(1), dim=0)) == 520


def test_synthetic_small_sets_split_like_the_recipes(synthetic_omniglot: Omniglot) -> None:
    train = ["Balinese", "Early_Aramaic", "Korean", "Japanese_(katakana)", "Sanskrit", "Tagalog"]
    splits = synthetic_omniglot.split_by_alphabet(train, [], ["Greek", "Latin"])
    assert (splits.train.num_classes, splits.test.num_classes) == (20, 6)


def test_missing_real_data_names_the_files_and_folder(tmp_path: Path) -> None:
    reason = missing_real_omniglot(tmp_path)
    assert reason == (
        "real Omniglot data not found: expected images_background_small1.zip, "
        f"images_background_small2.zip in {tmp_path}"
    )
    (tmp_path / "images_background_small1.zip").touch()
    reason = missing_real_omniglot(tmp_path)
    assert (
        reason
        == f"real Omniglot data not found: expected images_background_small2.zip in {tmp_path}"
    )
    (tmp_path / "images_background_small2.zip").touch()
    assert missing_real_omniglot(tmp_path) is None


def outcome_of_missing_data() -> BaseException:
    """What ``require_data`` raises for missing data: a skip or a failure (BaseExceptions both,
    so neither escapes to decide this test's own outcome)."""
    try:
        require_data(False, "no data here")
    except BaseException as outcome:
        return outcome
    raise AssertionError("require_data(False, ...) neither skipped nor failed")


@pytest.mark.parametrize("value", ["true", "1", "True"])
def test_missing_data_fails_in_ci(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    outcome = outcome_of_missing_data()
    assert type(outcome) is pytest.fail.Exception, f"expected a failure, got {outcome!r}"
    assert str(outcome).startswith("no data here (CI=true: missing test data is a failure")
    require_data(True, "unused")  # present data neither skips nor fails


@pytest.mark.parametrize("value", [None, "", "false"])
def test_missing_data_skips_outside_ci(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    outcome = outcome_of_missing_data()
    assert type(outcome) is pytest.skip.Exception, f"expected a skip, got {outcome!r}"
    assert str(outcome) == "no data here"
