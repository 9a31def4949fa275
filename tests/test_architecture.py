"""The package's layers hold: ``lint-imports`` finds no import from a lower layer upwards.

The contracts live in pyproject.toml (``[tool.importlinter]``); the tool comes with the
``test`` extra. A missing tool fails here rather than skipping: CI must run the check.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail('lint-imports is not installed: pip install -e ".[test]" (import-linter)')
    return subprocess.run(
        [exe, "--no-cache", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_import_layers_hold() -> None:
    result = lint_imports()
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    kept = re.search(r"Contracts: (\d+) kept, 0 broken", report)
    assert kept is not None and int(kept.group(1)) >= 3, report


def test_a_layer_violation_fails_the_check(tmp_path: Path) -> None:
    # The same tool on a contract the real imports break (metalight.unroll imports the
    # optimizers, so putting it below them must be reported).
    config = tmp_path / "contracts.toml"
    config.write_text(
        '[tool.importlinter]\nroot_package = "metalight"\n\n'
        "[[tool.importlinter.contracts]]\n"
        'name = "reversed engine layers"\ntype = "layers"\n'
        'layers = ["metalight.optim", "metalight.unroll"]\n'
    )
    result = lint_imports("--config", str(config), cwd=tmp_path)
    report = result.stdout + result.stderr
    assert result.returncode != 0, report
    assert "metalight.unroll is not allowed to import metalight.optim" in report, report
    assert "0 kept, 1 broken" in report, report
