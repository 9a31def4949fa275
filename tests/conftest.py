"""Shared test configuration and the two Omniglot sources every test directory can use.

``omniglot_dir`` is the real data (the two small background sets in ``../shared/data``): only
tests whose subject is the real images use it. Locally it skips when the data is absent; in
CI (``CI=true``) it fails, so a CI run given no data cannot pass by skipping.

``synthetic_omniglot_dir`` is a tiny stand-in written at the start of the session in the
official layout, read by the real :class:`metalight.data.Omniglot` code: tests of sampling,
seeding, sharding, resuming, DataModule plumbing and CLI wiring use it and always run.
"""

from __future__ import annotations

import io
import os
import random
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

# Registered here, before any test module is collected: other directories (tests/bilevel)
# import these helpers too, and a later registration would come after that import.
pytest.register_assert_rewrite("tests.reliability._helpers")

# The test models are tiny: on a 2-core machine intra-op threads only add hand-off latency
# (measured here: a 10-task MLP meta-step took 160 ms with 2 threads, 22 ms with 1).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# CI clones the repository elsewhere with shared/ beside it, so locate data from the repo root.
OMNIGLOT_DIR = REPO.parent / "shared" / "data" / "omniglot"
SMALL_SETS = ("images_background_small1", "images_background_small2")

# The alphabets of the real small sets (Greek and Latin are in both, as identical copies) with
# a few characters each instead of 17 to 47: enough for 20-way tasks, both the character and
# the alphabet splits the recipes use, and 5-way tasks on every alphabet-split test split.
SYNTHETIC_ALPHABETS: dict[str, dict[str, int]] = {
    "images_background_small1": {
        "Balinese": 3,
        "Early_Aramaic": 3,
        "Greek": 3,
        "Korean": 4,
        "Latin": 3,
    },
    "images_background_small2": {
        "Greek": 3,
        "Japanese_(katakana)": 4,
        "Latin": 3,
        "Sanskrit": 4,
        "Tagalog": 2,
    },
}
SYNTHETIC_DRAWERS = 20  # as in Omniglot, so shots + queries > 20 fails as on the real data
# Every class once: Greek and Latin count once though both sets hold them.
SYNTHETIC_CLASSES = sum(
    {a: n for alphabets in SYNTHETIC_ALPHABETS.values() for a, n in alphabets.items()}.values()
)


def in_ci() -> bool:
    """Whether this run is CI's, which must fail rather than skip on missing data."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require_data(present: bool, message: str) -> None:
    """Skips the test (locally) or fails it (in CI) with ``message`` unless ``present``."""
    if present:
        return
    if in_ci():
        pytest.fail(f"{message} (CI=true: missing test data is a failure, not a skip)")
    pytest.skip(message)


def missing_real_omniglot(root: Path = OMNIGLOT_DIR) -> str | None:
    """The one-line reason the real small Omniglot sets are unusable, or ``None``."""
    missing = [f"{s}.zip" for s in SMALL_SETS if not (root / f"{s}.zip").is_file()]
    if not missing:
        return None
    return f"real Omniglot data not found: expected {', '.join(missing)} in {root}"


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
    """The folder holding the real ``images_background_small1/2.zip``."""
    reason = missing_real_omniglot()
    require_data(reason is None, reason or "")
    return OMNIGLOT_DIR


def _drawing(seed: int) -> bytes:
    """One 105x105 grey PNG of dark strokes on white, as Omniglot's, unique to ``seed``."""
    rng = random.Random(seed)
    image = Image.new("L", (105, 105), 255)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        points = [(rng.randint(10, 95), rng.randint(10, 95)) for _ in range(3)]
        draw.line(points, fill=rng.randint(0, 60), width=rng.randint(3, 7))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_synthetic_omniglot(root: Path) -> Path:
    """Writes the small sets of :data:`SYNTHETIC_ALPHABETS` as zips in ``root``.

    The layout is the official one, ``<set>/<alphabet>/<character>/<drawer>.png``; a class
    present in two sets gets the same bytes in both, as Greek and Latin do in the real sets.
    """
    root.mkdir(parents=True, exist_ok=True)
    for set_name, alphabets in SYNTHETIC_ALPHABETS.items():
        with zipfile.ZipFile(root / f"{set_name}.zip", "w") as archive:
            for alphabet, characters in alphabets.items():
                for c in range(1, characters + 1):
                    folder = f"{set_name}/{alphabet}/character{c:02d}"
                    # The seed depends on the class only, not the set, so shared classes match.
                    base = zlib.crc32(f"{alphabet}/{c}".encode()) * 100
                    for d in range(1, SYNTHETIC_DRAWERS + 1):
                        archive.writestr(f"{folder}/{c:04d}_{d:02d}.png", _drawing(base + d))
    return root


@pytest.fixture(scope="session")
def synthetic_omniglot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with synthetic ``images_background_small1/2.zip`` (see the module docstring)."""
    return write_synthetic_omniglot(tmp_path_factory.mktemp("synthetic_omniglot"))
