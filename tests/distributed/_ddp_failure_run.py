"""Runs the DDP failure-mode jobs of ``test_ddp_failures.py`` in real processes (CPU, gloo).

Launched as ``python tests/distributed/_ddp_failure_run.py --out DIR`` with 2 devices and
``DDPStrategy`` (Lightning re-launches this script for rank 1); it runs two jobs, in this
order, in the same processes:

* ``conv4``: MAML on a Conv-4 (which trains with the per-task loop, never the vectorised
  step) for a few outer steps; every rank writes ``DIR/conv4/rank<rank>.pt`` (the gradient
  buckets DDP reduced per step, see ``_ddp_run.Recorder``), ``DIR/conv4/path<rank>.txt``
  (which meta-step ran) and ``DIR/conv4/params<rank>.pt`` (its final meta-parameters).
* ``nan`` (last: it ends the processes): MAML (``nan_policy="raise"``) whose inner loss is
  NaN on rank 1 only, at the second outer step. Every rank writes
  ``DIR/nan/error<rank>.txt`` (``"<type>: <message>"``, or ``"no error"``) and exits.
"""

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

from metalight.algorithms import MAML
from metalight.data import EpisodicDataModule, FewShotDataset, SinusoidDataModule
from metalight.models import MLP, Conv4
from tests.distributed._ddp_run import Recorder, make_strategy, trainer_kwargs

STEPS = 3
NAN_STEP = 1
SGD = functools.partial(torch.optim.SGD, lr=0.05)


class NaNOnRankOne(MAML):
    """MAML whose inner loss is NaN on global rank 1 at outer step ``NAN_STEP`` only."""

    def inner_loss(self, output: torch.Tensor, target: torch.Tensor, task: Any) -> torch.Tensor:
        loss = super().inner_loss(output, target, task)
        trainer = self.trainer
        if trainer.global_rank == 1 and trainer.global_step == NAN_STEP and trainer.training:
            return loss * float("nan")
        return loss


def images() -> EpisodicDataModule:
    g = torch.Generator().manual_seed(0)
    data = FewShotDataset(torch.rand(48, 1, 16, 16, generator=g), torch.arange(6).repeat(8))
    return EpisodicDataModule(
        data, ways=2, shots=1, queries=2, meta_batch_size=4, train_batches_per_epoch=STEPS
    )


def fit(module: MAML, datamodule: L.LightningDataModule, callbacks: list[Any]) -> L.Trainer:
    trainer = L.Trainer(
        devices=2,
        strategy=make_strategy("ddp"),
        callbacks=callbacks,
        enable_checkpointing=False,
        limit_val_batches=0,
        **trainer_kwargs(STEPS),
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer


def run_nan(out: Path) -> None:
    torch.manual_seed(0)
    module = NaNOnRankOne(MLP(hidden=(8,)), inner_optim=SGD, inner_steps=1)
    data = SinusoidDataModule(shots=5, queries=5, meta_batch_size=4, train_batches_per_epoch=5)
    try:
        trainer = fit(module, data, [])
    except BaseException as err:
        rank = module.trainer.global_rank
        (out / f"error{rank}.txt").write_text(f"{type(err).__name__}: {err}")
        sys.exit(3)
    (out / f"error{trainer.global_rank}.txt").write_text("no error")


def run_conv4(out: Path) -> None:
    torch.manual_seed(0)
    model = Conv4(in_channels=1, out_features=2, hidden=8, image_size=16)
    module = MAML(model, inner_optim=SGD, inner_steps=1)
    trainer = fit(module, images(), [Recorder(out)])
    rank = trainer.global_rank
    (out / f"path{rank}.txt").write_text("vectorised" if module._vectorized else "loop")
    params = {k: v.detach().clone() for k, v in module.state_dict().items()}
    torch.save(params, out / f"params{rank}.pt")


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for job, run in (("conv4", run_conv4), ("nan", run_nan)):
        (args.out / job).mkdir(parents=True, exist_ok=True)
        run(args.out / job)


if __name__ == "__main__":
    main()
