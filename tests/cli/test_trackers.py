"""Experiment trackers in a real (tiny) run, all offline, each read back with its own reader:
the composed config and the final test metrics with their 95% CI must be in what it wrote."""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig

from metalight.run import train
from tests.cli.conftest import TINY

pytest.importorskip("wandb", reason="pip install metalight[trackers]")
pytest.importorskip("mlflow", reason="pip install metalight[trackers]")
pytest.importorskip("tensorboard", reason="pip install metalight[trackers]")

# What every tracker must hold: a value of the composed config and the final test metrics.
FINAL = ("test/loss_post", "test/loss_post_ci95", "test/loss_pre")


def _wandb_records(run_folder: Path) -> list[Any]:
    """The records of W&B's offline transaction log (run-<id>.wandb), parsed with W&B's own
    protobuf schema. The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks
    of records, each with a 7-byte header (crc32, length, FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_folder.glob("run-*.wandb")
    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B transaction log"
    block, pos, part, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # padding to the end of the block
            pos += left
            continue
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def _wandb_config_and_summary(run_folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for record in _wandb_records(run_folder):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
    return config, summary


def test_every_tracker_holds_the_config_and_the_final_metrics(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    compose_train: Callable[..., DictConfig],
) -> None:
    monkeypatch.chdir(tmp_path)
    # W&B keeps settings and caches in the home directory: keep them in the test's.
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_train(
        [
            "+recipe=maml",
            "logger=[csv,tensorboard,wandb,mlflow]",
            *TINY,
            "trainer.max_steps=2",
            "algorithm.inner_steps=3",  # a value to find in each tracker's config
            f"paths.output_dir={tmp_path / 'runs'}",
        ]
    )
    results = train(cfg)
    final = {key: results["metrics"][key] for key in FINAL}
    trackers = results["trackers"]
    assert set(trackers) == {"csv", "tensorboard", "wandb", "mlflow"}
    saved = json.loads((Path(results["run_dir"]) / "results.json").read_text())
    assert saved["trackers"] == trackers

    # W&B, offline: the run folder that `wandb sync` uploads.
    run_folder = Path(trackers["wandb"]["dir"])
    assert trackers["wandb"]["sync"] == f"wandb sync {run_folder}"
    config, summary = _wandb_config_and_summary(run_folder)
    assert config["algorithm"]["inner_steps"] == 3
    assert config["recipe"]["name"] == "maml"
    for key, value in final.items():
        assert summary[key] == pytest.approx(value, rel=1e-6), key

    # MLflow: the local SQLite store, searched with mlflow's API.
    import mlflow

    mlflow.set_tracking_uri(trackers["mlflow"]["tracking_uri"])
    (run,) = mlflow.search_runs(
        experiment_ids=[trackers["mlflow"]["experiment_id"]], output_format="list"
    )
    assert run.info.run_id == trackers["mlflow"]["run_id"]
    assert run.data.params["algorithm/inner_steps"] == "3"
    for key, value in final.items():
        assert run.data.metrics[key] == pytest.approx(value, rel=1e-6), key

    # TensorBoard: the event files, read with TensorBoard's event reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(trackers["tensorboard"]["dir"])
    events.Reload()
    for key, value in final.items():
        assert events.Scalars(key)[-1].value == pytest.approx(value, rel=1e-6), key
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["algorithm/inner_steps"].number_value == 3

    # CSV, as before.
    assert Path(trackers["csv"]["metrics"]).is_file()


def test_many_is_every_tracker(compose_train: Callable[..., DictConfig]) -> None:
    many = compose_train(["logger=many"]).logger
    listed = compose_train(["logger=[csv,tensorboard,wandb,mlflow]"]).logger
    assert many == listed
    assert [node._target_.rsplit(".", 1)[-1] for node in many.values()] == [
        "CSVLogger",
        "TensorBoardLogger",
        "WandbLogger",
        "MLFlowLogger",
    ]
    assert many.wandb.offline is True
    assert str(many.mlflow.tracking_uri).startswith("sqlite:///")


def test_a_missing_tracker_package_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from metalight.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    assert main(["train", "logger=[csv,wandb]", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "metalight train: error: logger.wandb (WandbLogger) needs the wandb package: "
        "pip install 'metalight[trackers]' (or wandb), or leave it out (logger=csv)"
    )
