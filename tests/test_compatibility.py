"""The declared torch range is the one docs/compatibility.md records as tested, and the torch
running these tests lies in it (a run on another torch must be recorded before it is claimed)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "compatibility.md").read_text()


def declared_torch() -> str:
    # A regex, not tomllib: that is Python 3.11+ and the project supports 3.10.
    (spec,) = re.findall(
        r'^\s*"(torch[<>=!~][^"]*)",?$', (ROOT / "pyproject.toml").read_text(), re.M
    )
    return spec


def minor(version: str) -> tuple[int, int]:
    """``"2.14.1+cu130"`` -> ``(2, 14)``."""
    found = re.match(r"(\d+)\.(\d+)", version)
    assert found, f"cannot read a version from {version!r}"
    return int(found[1]), int(found[2])


def bounds(spec: str) -> tuple[tuple[int, int], tuple[int, int]]:
    found = re.fullmatch(r"torch>=(\d+\.\d+)(?:\.0)?,<(\d+\.\d+)", spec)
    assert found, f"expected the torch requirement as 'torch>=A.B,<C.D', got {spec!r}"
    return minor(found[1]), minor(found[2])


def test_pyproject_range_is_the_documented_one() -> None:
    spec = declared_torch()
    assert f"Declared range: `{spec}`" in DOC, f"docs/compatibility.md must state `{spec}`"


def test_range_spans_exactly_the_tested_versions() -> None:
    low, high = bounds(declared_torch())
    tested = sorted(minor(v) for v in re.findall(r"^\| (\d+\.\d+\.\d+) \|", DOC, flags=re.M))
    assert tested, "docs/compatibility.md lists no tested torch version"
    # The lower bound is the oldest tested minor, and the upper bound the one after the newest:
    # no untested minor release is claimed at either end.
    assert low == tested[0], f"lower bound {low} is not the oldest tested minor {tested[0]}"
    after = (tested[-1][0], tested[-1][1] + 1)
    assert high == after, f"upper bound {high} should be {after}, just past the newest tested"


def test_running_torch_is_in_the_declared_range() -> None:
    spec = declared_torch()
    low, high = bounds(spec)
    assert low <= minor(torch.__version__) < high, (
        f"torch {torch.__version__} is outside the declared {spec}; if the rest of the suite "
        "passes, record it in docs/compatibility.md and widen the range in pyproject.toml"
    )
