"""A small, fully checkpointed meta-learning run, for the kill-and-resume and determinism tests.

``python tests/reliability/_train.py --out DIR [--resume] [--dropout P] [--rng-callback]
[--num-workers N] [--threads N] [--stall-at STEP] [--max-steps N] [--seed S]``

MAML with learnable per-layer inner learning rates, an outer Adam with a StepLR schedule, on
``SinusoidDataModule`` (13 meta-batches per epoch, validation at every epoch end), with
``ModelCheckpoint(every_n_train_steps=5, save_last=True)`` saving through
:class:`~metalight.lightning.checkpoint_io.AtomicCheckpointIO`. Every checkpoint falls
inside an epoch (5 and 13 are coprime and runs stay under 65 steps).

Writes, under ``DIR``:

* ``checkpoints/``: the checkpoints (``--resume`` continues from ``last.ckpt`` there);
* ``--progress FILE`` (default ``DIR/progress.txt``): one line per finished training batch,
  ``step epoch batch_idx meta_loss`` with the loss as ``float.hex``, and one line per
  validation, ``val step <metric>=<hex> ...``; each line is flushed at once, so the file
  tells a watching process how far the run got;
* ``result.pt`` at the end: final meta-parameters, outer optimizer and scheduler states,
  test metrics and the global step.
"""

from __future__ import annotations

import argparse
import functools
import io
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch import nn  # noqa: E402

from metalight.algorithms import MAML  # noqa: E402
from metalight.data import SinusoidDataModule  # noqa: E402
from metalight.lightning.checkpoint_io import AtomicCheckpointIO, atomic_write  # noqa: E402
from metalight.lightning.determinism import RNGStateCallback, enable_determinism  # noqa: E402

BATCHES_PER_EPOCH = 13
CKPT_EVERY = 5


class DropoutNet(nn.Module):
    """A 1-32-32-1 ReLU network with dropout after each hidden layer (random in training)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Linear(1, 32), nn.ReLU(), nn.Dropout(p), nn.Linear(32, 32), nn.ReLU(), nn.Dropout(p)
        )
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Progress(Callback):
    """Appends one flushed line per training batch and per validation to a file."""

    def __init__(self, path: Path, stall_at: int) -> None:
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - kept open for the run
        self.stall_at = stall_at

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        loss = float(outputs["loss"].detach())
        self.file.write(f"{trainer.global_step} {trainer.current_epoch} {idx} {loss.hex()}\n")
        self.file.flush()
        if trainer.global_step == self.stall_at:
            time.sleep(3600)  # until killed

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        metrics = sorted(
            (k, float(v)) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
        )
        fields = " ".join(f"{k}={v.hex()}" for k, v in metrics)
        self.file.write(f"val {trainer.global_step} {fields}\n")
        self.file.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--progress", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--resume", action="store_true", help="resume from checkpoints/last.ckpt")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--rng-callback", action="store_true")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--stall-at", type=int, default=-1, help="hang after this step (to be killed there)"
    )
    return parser.parse_args(argv)


def train(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs (or resumes) the training run and returns (and saves) its result."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    enable_determinism(args.seed)
    model: nn.Module
    if args.dropout > 0:
        model = DropoutNet(args.dropout)
    else:
        model = nn.Sequential(
            nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
        )
    module = MAML(
        model,
        inner_optim=functools.partial(torch.optim.SGD, lr=0.02),
        inner_steps=2,
        eval_inner_steps=3,
        learn_inner_lr="per_layer",
        outer_optim=functools.partial(torch.optim.Adam, lr=3e-3),
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=7, gamma=0.9),
    )
    data = SinusoidDataModule(
        shots=5,
        queries=5,
        meta_batch_size=4,
        train_batches_per_epoch=BATCHES_PER_EPOCH,
        val_episodes=8,
        test_episodes=16,
        eval_meta_batch_size=4,
        seed=args.seed,
        num_workers=args.num_workers,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoints = ModelCheckpoint(
        dirpath=args.out / "checkpoints", every_n_train_steps=CKPT_EVERY, save_last=True
    )
    progress = Progress(args.progress or args.out / "progress.txt", args.stall_at)
    callbacks: list[Callback] = [progress, checkpoints]
    if args.rng_callback:
        callbacks.append(RNGStateCallback())
    trainer = L.Trainer(
        max_steps=args.max_steps,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=args.out,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, datamodule=data, ckpt_path="last" if args.resume else None)
    (test,) = trainer.test(module, datamodule=data, verbose=False)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    result = {
        "global_step": trainer.global_step,
        "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": scheduler.state_dict(),
        "test": test,
    }
    buffer = io.BytesIO()
    torch.save(result, buffer)
    atomic_write(args.out / "result.pt", buffer.getvalue())
    progress.file.close()
    return result


if __name__ == "__main__":
    train()
