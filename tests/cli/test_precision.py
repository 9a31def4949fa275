"""A float64 run (``trainer.precision=64-true``) is resumed, evaluated and loaded in float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import metalight
from metalight.cli import main
from metalight.lightning.checkpoint_io import load_checkpoint_file
from tests.cli.conftest import TINY, only_run_dir


def test_a_float64_run_is_loaded_with_its_exact_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lightning restores a checkpoint before its precision plugin converts the module: a
    # module built in float32 would get the float64 weights rounded.
    monkeypatch.chdir(tmp_path)
    argv = ["train", "+recipe=maml", *TINY, "trainer.precision=64-true", "logger=none"]
    assert main([*argv, "paths.output_dir=runs"]) == 0
    run_dir = only_run_dir(tmp_path / "runs")
    saved = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    loaded = metalight.load(run_dir).module.state_dict()
    assert saved.keys() == loaded.keys()
    for name, value in saved.items():
        if value.is_floating_point():
            assert value.dtype == torch.float64, name
        assert torch.equal(loaded[name], value), name
