"""Atomic checkpoint saves and run directories: kills and failures never lose saved work."""

from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from metalight.algorithms import MAML
from metalight.data import SinusoidDataModule
from metalight.lightning.checkpoint_io import (
    AtomicCheckpointIO,
    CorruptCheckpointError,
    DiskFullError,
    _atomic_write_with,
    atomic_write,
    load_checkpoint_file,
)
from metalight.models import MLP
from metalight.run.resources import make_run_dir
from tests.reliability import _save_loop
from tests.reliability._helpers import HERE, child_env, wait_until

SAVE_LOOP = HERE / "_save_loop.py"


def done_versions(path: Path) -> list[int]:
    done = Path(f"{path}.done")
    if not done.exists():
        return []
    return [int(v) for v in done.read_text().splitlines(keepends=True) if v.endswith("\n")]


def partial_files(path: Path, mode: str) -> list[Path]:
    if mode == "plain":
        return [path] if path.exists() else []
    return [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]


@pytest.mark.skipif(sys.platform == "win32", reason="uses SIGKILL")
@pytest.mark.parametrize("mode", ["atomic", "plain"])
def test_sigkill_in_the_middle_of_a_save(tmp_path: Path, mode: str) -> None:
    """Kill a process while it overwrites a 32 MB checkpoint, half-way through the write."""
    path = tmp_path / "last.ckpt"
    buffer = io.BytesIO()
    torch.save(_save_loop.checkpoint(1), buffer)
    full = len(buffer.getvalue())  # every version has this size
    proc = subprocess.Popen(
        [sys.executable, str(SAVE_LOOP), mode, str(path)], env=child_env(), cwd=HERE
    )
    try:
        wait_until(lambda: len(done_versions(path)) >= 1, proc, 120, "the first save")

        def writing_second_half_missing() -> bool:
            # Version >= 2 is being written and less than half of it is on disk.
            if not done_versions(path):
                return False
            for p in partial_files(path, mode):
                try:
                    size = p.stat().st_size
                except FileNotFoundError:
                    continue
                if 0 < size < full // 2:
                    return True
            return False

        wait_until(writing_second_half_missing, proc, 120, "a save in progress")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    completed = done_versions(path)[-1]
    plugin = AtomicCheckpointIO()
    if mode == "plain":
        # The contrast: a plain torch.save killed mid-write leaves a truncated file, and
        # loading it says so.
        with pytest.raises(CorruptCheckpointError, match=r"last\.ckpt \(\d+ bytes\) is truncated"):
            plugin.load_checkpoint(path)
        return
    checkpoint = plugin.load_checkpoint(path)
    # The last completed version (or, if the rename won the race with the kill, the next).
    assert checkpoint["version"] in (completed, completed + 1)
    assert all(
        torch.equal(b, torch.full_like(b, checkpoint["version"])) for b in checkpoint["blocks"]
    )
    assert path.stat().st_size == full
    leftovers = [p for p in tmp_path.iterdir() if p.name not in ("last.ckpt", "last.ckpt.done")]
    assert leftovers, "the kill should have interrupted a write"
    for p in leftovers:
        # Hidden, not *.ckpt (so ckpt_path="last" never picks it), and indeed incomplete.
        assert p.name.startswith(".last.ckpt.") and p.suffix == ".tmp"
        assert not zipfile.is_zipfile(p)


def test_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "epoch=0-step=5.ckpt"
    io.save_checkpoint({"step": 5, "w": torch.arange(4.0)}, path)

    def disk_full(f) -> None:  # type: ignore[no-untyped-def]
        f.write(b"PK\x03\x04" + bytes(1000))
        raise OSError(28, "No space left on device")

    with pytest.raises(
        DiskFullError, match=r"no space left on the device writing .*step=5\.ckpt \("
    ) as err:
        _atomic_write_with(path, disk_full)
    assert err.value.errno == 28 and "previous version, if any, is intact" in str(err.value)
    with pytest.raises(AttributeError, match=r"Can't (pickle|get) local object"):
        io.save_checkpoint({"step": 10, "w": torch.ones(4), "bad": lambda: 0}, path)
    with pytest.raises(TypeError, match="takes no storage_options"):
        io.save_checkpoint({"step": 10}, path, storage_options={"x": 1})
    assert os.listdir(tmp_path) == [path.name]
    assert io.load_checkpoint(path)["step"] == 5


def test_saved_files_get_the_usual_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a" / "config.yaml", "seed: 0\n")
        atomic_write(tmp_path / "a" / "config.yaml", b"seed: 1\n")
    finally:
        os.umask(umask)
    assert (tmp_path / "a" / "config.yaml").read_text() == "seed: 1\n"
    if os.name == "posix":
        assert (tmp_path / "a" / "config.yaml").stat().st_mode & 0o777 == 0o644


def test_trainer_saves_through_the_plugin(tmp_path: Path) -> None:
    calls: list[str] = []

    class Recording(AtomicCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):  # type: ignore[no-untyped-def]
            calls.append(os.path.basename(path))
            super().save_checkpoint(checkpoint, path, storage_options)

    trainer = L.Trainer(
        plugins=[Recording()],
        callbacks=[ModelCheckpoint(tmp_path, every_n_train_steps=1, save_last=True)],
        max_steps=2,
        accelerator="cpu",
        logger=False,
        inference_mode=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    trainer.fit(MAML(MLP(hidden=(4,))), SinusoidDataModule(meta_batch_size=2))
    assert calls == ["epoch=0-step=1.ckpt", "last.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"]
    assert sorted(os.listdir(tmp_path)) == ["epoch=0-step=2.ckpt", "last.ckpt"]


def test_concurrent_runs_get_distinct_directories(tmp_path: Path) -> None:
    n = 16
    barrier = threading.Barrier(n)
    made: list[Path] = []
    lock = threading.Lock()

    def start_run() -> None:
        barrier.wait()
        path = make_run_dir(tmp_path / "runs", "maml")
        with lock:
            made.append(path)

    threads = [threading.Thread(target=start_run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = sorted(p.name for p in made)
    assert len(set(made)) == n
    assert set(names) == {"maml"} | {f"maml_{i}" for i in range(1, n)}
    assert all(p.parent == tmp_path / "runs" and p.is_dir() for p in made)


def test_an_existing_run_directory_is_never_reused(tmp_path: Path) -> None:
    old = tmp_path / "run"
    old.mkdir()
    (old / "last.ckpt").write_bytes(b"previous run")
    new = make_run_dir(tmp_path, "run")
    assert new == tmp_path / "run_1" and not any(new.iterdir())
    assert (old / "last.ckpt").read_bytes() == b"previous run"


def _saved(path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.arange(64.0)}, "global_step": 3}, path)
    return path


def _rewrite_member(path: Path, member_suffix: str, data: bytes) -> None:
    """Replaces one member of the archive, with a correct checksum for the new bytes."""
    with zipfile.ZipFile(path) as archive:
        members = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, blob in members:
            archive.writestr(name, data if name.endswith(member_suffix) else blob)


def test_bit_rot_in_tensor_data_is_caught_by_the_checksums(tmp_path: Path) -> None:
    path = _saved(tmp_path / "last.ckpt")
    with zipfile.ZipFile(path) as archive:
        (info,) = [i for i in archive.infolist() if i.filename.endswith("/data/0")]
    blob = bytearray(path.read_bytes())
    # Stored uncompressed: the tensor's bytes follow the 30-byte local header, name and extra.
    with open(path, "rb") as f:
        f.seek(info.header_offset + 28)
        extra_len = int.from_bytes(f.read(2), "little")
    start = info.header_offset + 30 + len(info.filename.encode()) + extra_len
    blob[start + 4 * 10 + 3] ^= 0x01  # one flipped bit in w[10]
    path.write_bytes(bytes(blob))
    # The contrast: torch.load never checks, and returns a silently changed weight.
    rotten = torch.load(path, weights_only=True)["state_dict"]["w"]
    assert not torch.equal(rotten, torch.arange(64.0))
    assert torch.equal(rotten[:10], torch.arange(10.0))
    for load in (load_checkpoint_file, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(CorruptCheckpointError) as err:
            load(path)
        message = str(err.value)
        assert f"checkpoint file {path} is damaged: " in message
        assert "/data/0 fails its CRC" in message
        assert "\n" not in message


def test_a_corrupt_pickle_never_advises_unsafe_loading(tmp_path: Path) -> None:
    path = _saved(tmp_path / "last.ckpt")
    # A well-formed archive (correct checksums) whose pickle names a global that is not allowed.
    _rewrite_member(path, "/data.pkl", pickle.dumps(Path("x"), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="`weights_only` set to `False`"):
        torch.load(path, weights_only=True)
    garbage = _saved(tmp_path / "garbage.ckpt")
    _rewrite_member(garbage, "/data.pkl", b"\x80\x02garbage that is no pickle")
    for bad in (path, garbage):
        for load in (load_checkpoint_file, AtomicCheckpointIO().load_checkpoint):
            with pytest.raises(CorruptCheckpointError) as err:
                load(bad)
            message = str(err.value)
            assert message.startswith(f"checkpoint file {bad} is damaged or not a checkpoint: ")
            assert "weights_only" not in message and "\n" not in message
            assert "trust" not in message and "Weights only" not in message


def test_another_zip_and_a_directory_are_named_as_such(tmp_path: Path) -> None:
    other = tmp_path / "notes.ckpt"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("notes.txt", "hello")
    with pytest.raises(CorruptCheckpointError, match=r"is a zip archive but not a torch\.save"):
        load_checkpoint_file(other)
    with pytest.raises(IsADirectoryError, match=r"is a directory, not a checkpoint file; give a"):
        load_checkpoint_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint_file(tmp_path / "missing.ckpt")
    assert load_checkpoint_file(_saved(tmp_path / "good.ckpt"))["global_step"] == 3


def test_trainer_plugins_from_the_config_keep_the_atomic_saves(tmp_path: Path) -> None:
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from omegaconf import OmegaConf

    from metalight.run.build import build_trainer

    cfg = OmegaConf.create(
        {
            "trainer": {
                "_target_": "lightning.Trainer",
                "accelerator": "cpu",
                "logger": False,
                "enable_progress_bar": False,
                "plugins": [
                    {
                        "_target_": "lightning.fabric.plugins.environments.SLURMEnvironment",
                        "auto_requeue": True,
                    }
                ],
            }
        }
    )
    trainer = build_trainer(cfg)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
