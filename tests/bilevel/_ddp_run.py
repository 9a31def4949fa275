"""Runs a tiny bilevel training under real 2-process DDP (CPU, gloo) for ``test_ddp.py``.

``python tests/bilevel/_ddp_run.py --out DIR`` (Lightning re-launches it once per process).

:class:`~metalight.bilevel.HyperLR` (per-layer learning rates and weight decay) over inner
SGD with momentum and weight decay, online (the inner weights and momentum carry over) and
restarted from ``model``'s weights every ``RESTART_EVERY`` outer steps; outer SGD with
momentum (not Adam, whose first step hides the scale of the gradient, so a sum of the ranks'
hypergradients would pass for their mean); digits in float64 (``precision="64-true"``), one
outer step per process per global meta-batch of 2.

Two fits in the same processes: ``full`` trains ``STEPS`` outer steps and saves a checkpoint
at step ``CKPT_STEP``; ``resume`` restarts from that checkpoint and trains to ``STEPS``. Each
writes ``DIR/<job>/rank<r>.pt`` from every rank: the outer-step data this rank trained on,
the initial and final module state, the inner training in progress (this rank's) and the
outer optimizer's state.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from metalight.bilevel import HyperLR  # noqa: E402
from metalight.data.digits import DigitsDataModule  # noqa: E402
from metalight.models import MLP  # noqa: E402

STEPS = 5
CKPT_STEP = 2
RESTART_EVERY = 4
INNER_STEPS = 3
BATCH_SIZE = 8
VAL_BATCH_SIZE = 16
BATCHES_PER_EPOCH = 3  # the checkpoint is mid-epoch; the resumed run crosses an epoch end
INNER_LR, INNER_MOMENTUM = 0.3, 0.9
OUTER_LR, OUTER_MOMENTUM = 1.0, 0.5


def make_module() -> HyperLR:
    """The module, built in float64.

    Built in float64, not left to ``precision="64-true"``: Lightning loads a checkpoint's
    weights into the module before the precision plugin converts it, so a float32 module
    would round the resumed meta-parameters to float32.
    """
    torch.manual_seed(0)
    module = HyperLR(
        MLP(in_features=64, hidden=[8], out_features=10),
        inner_optim=functools.partial(
            torch.optim.SGD, lr=INNER_LR, momentum=INNER_MOMENTUM, weight_decay=1e-3
        ),
        inner_steps=INNER_STEPS,
        restart_every=RESTART_EVERY,
        init="fixed",
        outer_optim=functools.partial(torch.optim.SGD, lr=OUTER_LR, momentum=OUTER_MOMENTUM),
        init_weight_decay=1e-2,
        batch_size=BATCH_SIZE,
    )
    return module.double()


def make_datamodule() -> DigitsDataModule:
    return DigitsDataModule(
        inner_steps=INNER_STEPS,
        batch_size=BATCH_SIZE,
        val_batch_size=VAL_BATCH_SIZE,
        train_size=200,
        val_size=100,
        test_size=100,
        train_batches_per_epoch=BATCHES_PER_EPOCH,
        meta_batch_size=2,
        val_episodes=2,
        test_episodes=2,
        seed=0,
    )


class Recorder(Callback):
    """Keeps the data of every outer step of this rank and writes the rank's record."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.steps: list[dict[str, Any]] = []
        self.initial: dict[str, torch.Tensor] = {}
        self.start_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step
        self.initial = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        fields = ("support_x", "support_y", "query_x", "query_y", "info")
        task = {f: getattr(batch, f).detach().clone() for f in fields}
        self.steps.append({"global_step": trainer.global_step, **task})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, HyperLR)
        record = {
            "world_size": trainer.world_size,
            "start_step": self.start_step,
            "end_step": trainer.global_step,
            "steps": self.steps,
            "initial": self.initial,
            "final": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "inner": pl_module._inner_entry(),
            "outer_optimizer": trainer.optimizers[0].state_dict(),
        }
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


def run_job(out: Path, devices: int, resume: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    callbacks: list[Callback] = [Recorder(out)]
    if resume is None:
        callbacks.append(
            ModelCheckpoint(
                dirpath=out / "ckpt",
                filename="{step}",
                every_n_train_steps=CKPT_STEP,
                save_top_k=-1,
            )
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=DDPStrategy(process_group_backend="gloo", start_method="popen"),
        precision="64-true",
        max_steps=STEPS,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=resume is None,
        callbacks=callbacks,
    )
    trainer.fit(make_module(), datamodule=make_datamodule(), ckpt_path=resume)


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    run_job(args.out / "full", args.devices, None)
    run_job(
        args.out / "resume", args.devices, args.out / "full" / "ckpt" / f"step={CKPT_STEP}.ckpt"
    )
    # Tear the process group down before the interpreter exits (gloo threads alive at exit
    # can abort a rank, as seen with tests/distributed/_ddp_run.py).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
