"""Shared fixtures: the real Omniglot subsets, decoded once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from metalight.data import Omniglot

# CI clones the repository elsewhere with shared/ beside it, so locate data from the repo root.
OMNIGLOT_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "omniglot"
SMALL_SETS = ("images_background_small1", "images_background_small2")


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
    if not all((OMNIGLOT_DIR / f"{s}.zip").is_file() for s in SMALL_SETS):
        pytest.skip(
            f"real Omniglot subsets not found: expected {SMALL_SETS} zips in {OMNIGLOT_DIR}"
        )
    return OMNIGLOT_DIR


@pytest.fixture(scope="session")
def omniglot_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="session")
def omniglot(omniglot_dir: Path, omniglot_cache: Path) -> Omniglot:
    """Both small sets merged (Greek and Latin deduplicated), 28x28."""
    return Omniglot(omniglot_dir, SMALL_SETS, image_size=28, cache_dir=omniglot_cache)
