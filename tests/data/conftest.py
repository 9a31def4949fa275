"""Omniglot datasets, decoded once per test session: the real small sets and the synthetic
stand-in (both folders come from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from metalight.data import Omniglot
from tests.conftest import OMNIGLOT_DIR, SMALL_SETS

__all__ = ["OMNIGLOT_DIR", "SMALL_SETS"]


@pytest.fixture(scope="session")
def omniglot_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="session")
def omniglot(omniglot_dir: Path, omniglot_cache: Path) -> Omniglot:
    """The real small sets merged (Greek and Latin deduplicated), 28x28."""
    return Omniglot(omniglot_dir, SMALL_SETS, image_size=28, cache_dir=omniglot_cache)


@pytest.fixture(scope="session")
def synthetic_omniglot_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic_omniglot_cache")


@pytest.fixture(scope="session")
def synthetic_omniglot(synthetic_omniglot_dir: Path, synthetic_omniglot_cache: Path) -> Omniglot:
    """The synthetic small sets merged by the real reader, 28x28 (26 classes of 20)."""
    return Omniglot(
        synthetic_omniglot_dir, SMALL_SETS, image_size=28, cache_dir=synthetic_omniglot_cache
    )
