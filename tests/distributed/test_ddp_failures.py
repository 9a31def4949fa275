"""DDP failure modes and the per-task loop under DDP (2 CPU processes, gloo).

* A NaN on one rank with ``nan_policy="raise"`` must stop every rank with
  :class:`~metalight.lightning.NonFiniteError` within a time limit: a rank that raised alone
  would leave the other waiting in the gradient all-reduce for ever.
* The per-task loop (every convolutional model; the DDP tests of ``test_ddp.py`` use an MLP,
  which takes the vectorised step) must reduce the meta-gradient exactly once per step.

Both read one launch of ``_ddp_failure_run.py`` (see its docstring).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.test_ddp import (
    _CLUSTER_PREFIXES,
    _CLUSTER_VARS,
    REPO,
    _free_port,
    assert_one_reduction_per_step,
    load,
    ranks,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="needs torch.distributed with the gloo backend",
    ),
]

SCRIPT = Path(__file__).with_name("_ddp_failure_run.py")
STEPS = 3
# A healthy 2-process launch of these jobs takes seconds; a hang is what this limit catches.
TIMEOUT_S = 120


def launch(out: Path) -> tuple[int, str]:
    """Runs ``_ddp_failure_run.py``; returns its exit status and output.

    The launch gets its own process group, so a hang is ended by killing every rank (Lightning
    starts rank 1 as a child of rank 0) before the test fails.
    """
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
    cmd = [sys.executable, str(SCRIPT), "--out", str(out)]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the ranks hung (no exit in {TIMEOUT_S} s):\n{output[-4000:]}")
    finally:
        # Rank 1 may outlive rank 0; never leave it behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, output


@pytest.fixture(scope="module")
def failure_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    out = tmp_path_factory.mktemp("ddp_failures")
    code, output = launch(out)
    return out, code, output


def test_a_nan_on_one_rank_stops_every_rank_with_a_nonfinite_error(
    failure_run: tuple[Path, int, str],
) -> None:
    out, code, output = failure_run
    errors = {p.name: p.read_text() for p in sorted((out / "nan").glob("error*.txt"))}
    assert sorted(errors) == ["error0.txt", "error1.txt"], f"rc={code}\n{output[-4000:]}"
    for name, text in errors.items():
        assert text.startswith("NonFiniteError: "), f"{name}: {text}\n{output[-3000:]}"
    # The rank that met the NaN names the task and the step; the other says where to look.
    assert "non-finite inner loss nan at inner step 0" in errors["error1.txt"]
    assert "batch 1" in errors["error0.txt"] and "another process" in errors["error0.txt"]
    assert code != 0


def test_the_per_task_loop_reduces_the_meta_gradient_once_per_step(
    failure_run: tuple[Path, int, str],
) -> None:
    out, _, output = failure_run
    run = out / "conv4"
    # Conv-4 trains with the per-task loop, on both ranks.
    paths = [(run / f"path{r}.txt").read_text() for r in (0, 1)]
    assert paths == ["loop", "loop"], output[-4000:]
    assert_one_reduction_per_step(ranks(out, "conv4"), STEPS)
    # The reduced meta-gradient kept the replicas equal.
    p0, p1 = load(run / "params0.pt"), load(run / "params1.pt")
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name
