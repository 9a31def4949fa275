"""A bilevel training under real 2-process DDP (CPU, gloo), against the mathematics.

One launch of ``_ddp_run.py`` (see its docstring), shared by the tests: HyperLR in float64,
``STEPS`` outer steps, a checkpoint at ``CKPT_STEP``, then a 2-process resume from it.

What is comparable: each rank trains its own inner model (weights and momentum carried over
between outer steps) on its own task of the global meta-batch (rank ``r`` gets task ``r``
of the 1-process stream), and DDP averages the two hypergradients. So the reference, written
here by hand (inner SGD with momentum and weight decay unrolled with ``create_graph``, the
validation loss differentiated, ``torch.optim.SGD`` for the outer step), keeps two inner
trainings and steps the meta-parameters with the mean of their hypergradients. A 1-process
run of the module is not comparable: it would train one inner model on every step's data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.bilevel._ddp_run import (
    BATCH_SIZE,
    CKPT_STEP,
    INNER_MOMENTUM,
    INNER_STEPS,
    OUTER_LR,
    OUTER_MOMENTUM,
    RESTART_EVERY,
    STEPS,
    make_datamodule,
    make_module,
)
from tests.distributed.test_ddp import _CLUSTER_PREFIXES, _CLUSTER_VARS, _free_port
from tests.reliability._helpers import assert_identical

pytest.importorskip("sklearn", reason="the digits data ships with scikit-learn")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="needs torch.distributed with the gloo backend",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("_ddp_run.py")
# Float64 throughout: the run and the reference differ only in the order of operations.
TOL = {"rtol": 1e-10, "atol": 1e-12}
META = ("log_lr", "log_weight_decay")

Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bilevel_ddp")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _CLUSTER_VARS and not k.startswith(_CLUSTER_PREFIXES)
    }
    env.update(
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    cmd = [sys.executable, str(SCRIPT), "--out", str(out)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout ---\n"
            f"{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return out


def ranks(run: Path, job: str) -> list[dict[str, Any]]:
    records = [torch.load(run / job / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(record["world_size"] == 2 for record in records)
    return records


def global_batches() -> list[Any]:
    """The first ``STEPS`` global meta-batches of 2 tasks, as one process draws them."""
    loader = make_datamodule().train_dataloader()
    batches: list[Any] = []
    while len(batches) < STEPS:
        batches += list(loader)  # one pass is one epoch
    return batches[:STEPS]


def reference(combine: Combine = lambda g0, g1: (g0 + g1) / 2) -> list[dict[str, Any]]:
    """Two inner trainings, one per rank, and outer SGD on ``combine`` of their hypergradients.

    Returns, after each outer step: the meta-parameters, each rank's inner weights, momentum
    and age, and each rank's hypergradient.
    """
    module = make_module()
    names = [name for name, _ in module.model.named_parameters()]
    layer_of = [0, 0, 1, 1]  # features.0.{weight,bias}, head.{weight,bias}
    assert names == ["features.0.weight", "features.0.bias", "head.weight", "head.bias"]
    start = [p.detach().clone() for p in module.model.parameters()]
    meta = [getattr(module, name).detach().clone().requires_grad_(True) for name in META]
    outer = torch.optim.SGD(meta, lr=OUTER_LR, momentum=OUTER_MOMENTUM)

    def forward(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module.model, dict(zip(names, weights)), (x,))

    inner: list[tuple[list[torch.Tensor], list[torch.Tensor] | None, int]] = [(start, None, 0)] * 2
    history = []
    for batch in global_batches():
        grads = []
        for r in (0, 1):
            task = batch[r]
            weights, momentum, age = inner[r]
            if age == RESTART_EVERY:
                weights, momentum, age = start, None, 0
            xs = task.support_x.double().reshape(INNER_STEPS, BATCH_SIZE, -1)
            ys = task.support_y.reshape(INNER_STEPS, BATCH_SIZE)
            log_lr, log_wd = meta
            # Leaves: the carried-over weights are constants of this outer step.
            w = [wi.detach().requires_grad_(True) for wi in weights]
            for s in range(INNER_STEPS):
                loss = F.cross_entropy(forward(w, xs[s]), ys[s])
                g = torch.autograd.grad(loss, w, create_graph=True)
                # torch.optim.SGD: d = g + wd * w; buf = d, then momentum * buf + d; w -= lr * buf
                d = [gi + log_wd[layer_of[i], 0].exp() * wi for i, (gi, wi) in enumerate(zip(g, w))]
                momentum = (
                    d
                    if momentum is None
                    else [INNER_MOMENTUM * b + di for b, di in zip(momentum, d)]
                )
                w = [
                    wi - log_lr[layer_of[i], 0].exp() * b
                    for i, (wi, b) in enumerate(zip(w, momentum))
                ]
            val = F.cross_entropy(forward(w, task.query_x.double()), task.query_y)
            grads.append(torch.autograd.grad(val, meta))
            inner[r] = ([wi.detach() for wi in w], [b.detach() for b in momentum], age + 1)
        for p, g0, g1 in zip(meta, *grads, strict=True):
            p.grad = combine(g0, g1)
        outer.step()
        history.append(
            {
                "meta": {name: p.detach().clone() for name, p in zip(META, meta)},
                "inner": list(inner),
                "grads": grads,
            }
        )
    return history


def assert_meta_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for name in META:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


def assert_inner_close(entry: dict[str, Any], want: tuple[Any, Any, int], where: str) -> None:
    weights, momentum, age = want
    assert entry["optimizer"] == "sgd" and entry["age"] == age, where
    for kind, got, expected in (
        ("weights", entry["params"], weights),
        ("momentum", entry["state"]["momentum_buffer"], momentum),
    ):
        assert len(got) == len(expected), f"{where} {kind}"
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            torch.testing.assert_close(
                a, b, **TOL, msg=lambda m, k=kind, i=i: f"{where} {k}[{i}]: {m}"
            )


def test_each_rank_trains_its_task_and_ddp_steps_with_the_mean_hypergradient(run: Path) -> None:
    rank0, rank1 = ranks(run, "full")
    # Rank r trained on task r of each global meta-batch, one task per outer step.
    for step, batch in enumerate(global_batches()):
        for r, record in enumerate((rank0, rank1)):
            got = record["steps"][step]
            assert got["global_step"] == step
            assert torch.equal(got["support_x"], batch.support_x[r : r + 1].double())
            assert torch.equal(got["support_y"], batch.support_y[r : r + 1])
            assert torch.equal(got["query_x"], batch.query_x[r : r + 1].double())
            assert torch.equal(got["info"], batch.info[r : r + 1])
    history = reference()
    # The two ranks' hypergradients differ (their own data and inner weights): averaging
    # them is not a no-op, at every step.
    for step in history:
        for g0, g1 in zip(*step["grads"], strict=True):
            assert (g0 - g1).abs().max() > 1e-4
    # DDP keeps the meta-parameters identical on both ranks, equal to the reference's.
    assert_identical(rank0["final"], rank1["final"], "final module state, rank 1 vs rank 0")
    assert_meta_close(rank0["final"], history[-1]["meta"])
    moved = max((rank0["final"][n] - rank0["initial"][n]).abs().max().item() for n in META)
    assert moved > 0.05
    # Neither the sum of the hypergradients nor either rank's own would give these values.
    for combine in (lambda g0, g1: g0 + g1, lambda g0, g1: g0, lambda g0, g1: g1):
        other = reference(combine)[-1]["meta"]
        gap = max((rank0["final"][n] - other[n]).abs().max().item() for n in META)
        assert gap > 1e-3
    # Each rank's inner training in progress is its own, carried over and restarted.
    for r, record in enumerate((rank0, rank1)):
        assert_inner_close(record["inner"], history[-1]["inner"][r], f"rank {r} inner")
    assert (rank0["inner"]["params"][0] - rank1["inner"]["params"][0]).abs().max() > 1e-3


def test_the_checkpoint_holds_both_ranks_inner_training(run: Path) -> None:
    checkpoint = torch.load(run / "full" / "ckpt" / f"step={CKPT_STEP}.ckpt", weights_only=False)
    assert checkpoint["global_step"] == CKPT_STEP
    want = reference()[CKPT_STEP - 1]
    assert_meta_close(checkpoint["state_dict"], want["meta"])
    saved = checkpoint["bilevel_inner"]
    assert len(saved["ranks"]) == 2
    for r, entry in enumerate(saved["ranks"]):
        assert_inner_close(entry, want["inner"][r], f"checkpoint rank {r}")
    # The top level is rank 0's (what a 1-process evaluation of the checkpoint uses).
    assert_identical({k: v for k, v in saved.items() if k != "ranks"}, saved["ranks"][0], "top")
    assert (saved["ranks"][0]["params"][0] - saved["ranks"][1]["params"][0]).abs().max() > 1e-3


def test_a_two_process_resume_continues_bitwise(run: Path) -> None:
    full, resumed = ranks(run, "full"), ranks(run, "resume")
    for r, (want, got) in enumerate(zip(full, resumed, strict=True)):
        assert (got["start_step"], got["end_step"]) == (CKPT_STEP, STEPS)
        assert want["end_step"] == STEPS
        # The resumed rank trains on the data the uninterrupted one did, step for step.
        assert_identical(got["steps"], want["steps"][CKPT_STEP:], f"rank {r} data")
        assert_identical(got["final"], want["final"], f"rank {r} module state")
        assert_identical(got["inner"], want["inner"], f"rank {r} inner training")
        assert_identical(got["outer_optimizer"], want["outer_optimizer"], f"rank {r} optimizer")
