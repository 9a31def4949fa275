"""Real multi-process runs (CPU, gloo): DDP gives the 1-process meta-parameters and metrics.

Every run is ``_ddp_run.py`` in fresh processes (see its docstring), launched four times per
module and shared by the tests through module-scoped fixtures:

* ``ddp_run``: 2 processes, ``DDPStrategy`` (Lightning re-launches the script): MAML (saving
  a checkpoint at step 4) and ANIL (default ``find_unused_parameters=False``), then test;
  and MAML with ``nan_policy="skip"`` on tasks whose inner loss is NaN;
* ``single_run``: 1 process: the same MAML, ANIL and skipping runs, a MAML run resumed from
  the 2-process checkpoint, and a fit with a real FSDP strategy that must be refused;
* ``spawn_run``: 2 processes, ``ddp_spawn``: MAML;
* ``torchrun_resume``: 2 processes under ``torchrun`` (Lightning's TorchElastic environment,
  as on a cluster): MAML resumed from the 1-process checkpoint.

The global meta-batch is 4 tasks (2 per rank), 3 meta-batches per epoch, 7 outer SGD steps
with momentum, validation at each epoch end and 8 fixed test episodes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="needs torch.distributed with the gloo backend",
    ),
]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("_ddp_run.py")
STEPS = 7
CKPT_STEP = 4
EPISODES = 8
MAML_JOB = {"name": "maml", "algo": "maml", "steps": STEPS, "ckpt_every": CKPT_STEP, "test": True}
ANIL_JOB = {"name": "anil", "algo": "anil", "steps": STEPS, "test": True}
# MAML with nan_policy="skip" on tasks whose inner loss is NaN (chosen by task content).
SKIP_JOB = {"name": "skip", "algo": "skip", "steps": STEPS}
# Variables through which Lightning would detect a cluster (SLURM, torchrun, LSF, MPI,
# Kubeflow) if the test itself runs inside one; the launched runs must not inherit them.
_CLUSTER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "LSB_", "JSM_", "OMPI_", "PMI_", "PL_")
_CLUSTER_VARS = {"LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(
    out: Path,
    jobs: list[dict[str, Any]],
    *,
    devices: int,
    strategy: str,
    torchrun: bool = False,
) -> Path:
    """Runs ``_ddp_run.py`` with ``jobs`` in fresh processes; returns ``out``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _CLUSTER_VARS and not k.startswith(_CLUSTER_PREFIXES)
    }
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    args = ["--out", str(out), "--devices", str(devices), "--strategy", strategy]
    args += ["--jobs", json.dumps(jobs)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={devices}", str(SCRIPT), *args]
    else:
        cmd = [sys.executable, str(SCRIPT), *args]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout ---\n"
            f"{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return out


def load(path: Path) -> Any:
    return torch.load(path, weights_only=False)


def ranks(run: Path, job: str) -> list[dict[str, Any]]:
    records = [load(p) for p in sorted((run / job).glob("rank*.pt"))]
    assert records, f"no rank records in {run / job}"
    return records


def result(run: Path, job: str) -> dict[str, Any]:
    return load(run / job / "result.pt")


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_params(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        # float32 tolerances (rtol 1.3e-6, atol 1e-5): only the reduction order differs.
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"{n}: {m}")


def assert_same_metrics(got: dict[str, float], want: dict[str, float]) -> None:
    assert got.keys() == want.keys()
    keys = sorted(want)
    torch.testing.assert_close(
        torch.tensor([got[k] for k in keys], dtype=torch.float32),
        torch.tensor([want[k] for k in keys], dtype=torch.float32),
        msg=lambda m: f"{keys}: {m}",
    )


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    return launch(out, [MAML_JOB, ANIL_JOB, SKIP_JOB], devices=2, strategy="ddp")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory, ddp_run: Path) -> Path:
    out = tmp_path_factory.mktemp("single")
    ddp_ckpt = ddp_run / "maml" / "ckpt" / f"step={CKPT_STEP}.ckpt"
    jobs = [
        MAML_JOB,
        ANIL_JOB,
        SKIP_JOB,
        {"name": "resume", "algo": "maml", "steps": STEPS, "resume": str(ddp_ckpt)},
        {"name": "fsdp", "fsdp": True},  # last: it leaves a process group behind
    ]
    return launch(out, jobs, devices=1, strategy="auto")


@pytest.fixture(scope="module")
def spawn_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("spawn")
    job = {"name": "maml", "algo": "maml", "steps": STEPS}
    return launch(out, [job], devices=2, strategy="ddp_spawn")


@pytest.fixture(scope="module")
def torchrun_resume(tmp_path_factory: pytest.TempPathFactory, single_run: Path) -> Path:
    out = tmp_path_factory.mktemp("torchrun")
    ckpt = single_run / "maml" / "ckpt" / f"step={CKPT_STEP}.ckpt"
    job = {"name": "resume", "algo": "maml", "steps": STEPS, "resume": str(ckpt)}
    return launch(out, [job], devices=2, strategy="ddp", torchrun=True)


def assert_one_reduction_per_step(records: list[dict[str, Any]], steps: int) -> None:
    """Every outer step all-reduces each meta-parameter exactly once, in one round.

    DDP calls the communication hook once per gradient bucket; a backward's round ends with
    the bucket marked ``is_last``. Extra reductions (from the inner ``autograd.grad`` calls or
    a second backward) would show as a second round or a repeated bucket.
    """
    assert len(records) == 2
    max_buckets = 0
    for rank in records:
        assert rank["ddp"] and rank["world_size"] == 2
        assert len(rank["steps"]) == steps
        for step in rank["steps"]:
            buckets = step["buckets"]
            where = f"step {step['global_step']}: {buckets}"
            assert sum(b["is_last"] for b in buckets) == 1, where
            assert buckets[-1]["is_last"], where
            assert sorted(b["index"] for b in buckets) == list(range(len(buckets))), where
            assert sum(b["numel"] for b in buckets) == rank["num_meta_params"], where
            max_buckets = max(max_buckets, len(buckets))
    # Tiny buckets make a single backward span several hook calls, so the rounds are counted.
    assert max_buckets > 1


@pytest.mark.parametrize("algo", ["maml", "anil"])
def test_ddp_gives_the_one_process_meta_parameters(
    ddp_run: Path, single_run: Path, algo: str
) -> None:
    two, one = result(ddp_run, algo), result(single_run, algo)
    assert two["world_size"] == 2 and one["world_size"] == 1
    # The runs trained: the parameters moved well beyond the tolerance.
    assert max_abs_diff(one["params"], one["initial"]) > 1e-3
    assert_same_params(two["params"], one["params"])
    assert max_abs_diff(two["params"], one["params"]) < 1e-6


def test_ranks_train_on_the_two_halves_of_the_global_meta_batch(
    ddp_run: Path, single_run: Path
) -> None:
    (one,) = ranks(single_run, "maml")
    rank0, rank1 = ranks(ddp_run, "maml")
    for s1, s2a, s2b in zip(one["steps"], rank0["steps"], rank1["steps"]):
        assert s2a["tasks"].shape[0] == s2b["tasks"].shape[0] == s1["tasks"].shape[0] // 2
        assert torch.equal(torch.cat([s2a["tasks"], s2b["tasks"]]), s1["tasks"])


@pytest.mark.parametrize("algo", ["maml", "anil"])
def test_one_gradient_reduction_per_outer_step(ddp_run: Path, algo: str) -> None:
    records = ranks(ddp_run, algo)
    assert_one_reduction_per_step(records, STEPS)
    # ANIL adapts only its head, yet every parameter gets a gradient through the surrogate
    # loss, so DDP's default find_unused_parameters=False works (no unused-parameter error).
    assert all(rank["find_unused_parameters"] is False for rank in records)


@pytest.mark.parametrize("algo", ["maml", "anil"])
def test_validation_and_test_metrics_match_one_process(
    ddp_run: Path, single_run: Path, algo: str
) -> None:
    (one,) = ranks(single_run, algo)
    # Validation at the end of epochs 1 and 2 (steps 3 and 6), on every rank.
    assert [v["global_step"] for v in one["val"]] == [3, 6]
    for rank in ranks(ddp_run, algo):
        assert [v["global_step"] for v in rank["val"]] == [3, 6]
        for got, want in zip(rank["val"], one["val"]):
            assert got["metrics"]["val/episodes"] == want["metrics"]["val/episodes"] == EPISODES
            assert_same_metrics(got["metrics"], want["metrics"])
    two_test, one_test = result(ddp_run, algo)["test"], result(single_run, algo)["test"]
    assert {"test/loss_pre", "test/loss_post", "test/loss_post_ci95"} <= one_test.keys()
    assert two_test["test/episodes"] == one_test["test/episodes"] == EPISODES
    assert_same_metrics(two_test, one_test)


def test_ddp_spawn_gives_the_one_process_meta_parameters(spawn_run: Path, single_run: Path) -> None:
    records = ranks(spawn_run, "maml")
    assert_one_reduction_per_step(records, STEPS)
    # ddp_spawn hands rank 0's weights back to the launching process.
    assert_same_params(result(spawn_run, "maml")["params"], result(single_run, "maml")["params"])


def test_ddp_spawn_validation_metrics_match_one_process(spawn_run: Path, single_run: Path) -> None:
    records = ranks(spawn_run, "maml")
    (one,) = ranks(single_run, "maml")
    for rank in records:
        for got, want in zip(rank["val"], one["val"], strict=True):
            # Each episode counted once: spawned processes once shared one metric storage.
            assert got["metrics"]["val/episodes"] == EPISODES
            assert_same_metrics(got["metrics"], want["metrics"])


def test_ddp_checkpoint_resumes_on_one_process(ddp_run: Path, single_run: Path) -> None:
    ddp_ckpt = load(ddp_run / "maml" / "ckpt" / f"step={CKPT_STEP}.ckpt")
    one_ckpt = load(single_run / "maml" / "ckpt" / f"step={CKPT_STEP}.ckpt")
    assert ddp_ckpt["global_step"] == one_ckpt["global_step"] == CKPT_STEP
    # Same layout whatever the world size: no DDP "module." prefix, same stream position.
    assert ddp_ckpt["state_dict"].keys() == one_ckpt["state_dict"].keys()
    assert ddp_ckpt["SinusoidDataModule"] == one_ckpt["SinusoidDataModule"]
    (resumed,) = ranks(single_run, "resume")
    assert (resumed["start_step"], resumed["end_step"]) == (CKPT_STEP, STEPS)
    assert len(resumed["steps"]) == STEPS - CKPT_STEP
    (uninterrupted,) = ranks(single_run, "maml")
    for got, want in zip(resumed["steps"], uninterrupted["steps"][CKPT_STEP:]):
        assert torch.equal(got["tasks"], want["tasks"])
    # Equal to the uninterrupted 1-process run of the same total steps.
    assert_same_params(result(single_run, "resume")["params"], result(single_run, "maml")["params"])


def test_one_process_checkpoint_resumes_under_torchrun_ddp(
    torchrun_resume: Path, single_run: Path
) -> None:
    records = ranks(torchrun_resume, "resume")
    assert_one_reduction_per_step(records, STEPS - CKPT_STEP)
    (uninterrupted,) = ranks(single_run, "maml")
    for rank in records:
        assert (rank["start_step"], rank["end_step"]) == (CKPT_STEP, STEPS)
    for i, want in enumerate(uninterrupted["steps"][CKPT_STEP:]):
        halves = [rank["steps"][i]["tasks"] for rank in records]
        assert torch.equal(torch.cat(halves), want["tasks"])
    assert_same_params(
        result(torchrun_resume, "resume")["params"], result(single_run, "maml")["params"]
    )


def test_skipped_tasks_under_ddp_give_the_one_process_meta_parameters(
    ddp_run: Path, single_run: Path
) -> None:
    def skipped(run: Path) -> int:
        return sum(int(p.read_text()) for p in (run / "skip").glob("skipped*.txt"))

    # Some tasks were skipped, the same number in both runs, and training went on.
    assert len(list((ddp_run / "skip").glob("skipped*.txt"))) == 2
    assert 0 < skipped(single_run) == skipped(ddp_run) < STEPS * 4
    one, two = result(single_run, "skip"), result(ddp_run, "skip")
    assert max_abs_diff(one["params"], one["initial"]) > 1e-3
    # Each rank rescales its kept tasks by the global kept count, so DDP's average over
    # ranks is the mean over all kept tasks, as in one process.
    assert_same_params(two["params"], one["params"])
    # And it is not the unskipped run's result.
    assert max_abs_diff(one["params"], result(single_run, "maml")["params"]) > 1e-4


def test_fsdp_is_refused_at_start_up(single_run: Path) -> None:
    message = (single_run / "fsdp" / "error.txt").read_text()
    assert message.startswith("ValueError: CPUFSDPStrategy cannot train a MetaLearningModule")
    assert "shards the parameters" in message
    assert "strategy='ddp'" in message
