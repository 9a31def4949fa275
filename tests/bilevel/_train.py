"""A small, fully checkpointed bilevel run, for the kill-and-resume test.

``python tests/bilevel/_train.py --out DIR [--resume] [--stall-at STEP] [--max-steps N]``

:class:`~metalight.bilevel.HyperLR` (per-layer rates and weight decay, a 2-piece schedule)
over inner SGD with momentum (an optimizer state that carries over), truncated and
checkpointed unrolls, the inner training restarted from a random initialisation every 4
outer steps; outer Adam with a StepLR schedule; digits with 7 outer steps per epoch and
validation at every epoch end; ``ModelCheckpoint(every_n_train_steps=5, save_last=True)``.

Writes ``DIR/checkpoints/``, ``DIR/progress.txt`` (one flushed line per outer step,
``step epoch batch_idx outer_loss`` with the loss as ``float.hex``, and ``val step ...``
lines) and, at the end, ``DIR/result.pt``: the module's state, the inner training in
progress, the outer optimizer and scheduler states and the test metrics.
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

from metalight.bilevel import HyperLR  # noqa: E402
from metalight.data.digits import DigitsDataModule  # noqa: E402
from metalight.lightning.checkpoint_io import AtomicCheckpointIO, atomic_write  # noqa: E402
from metalight.lightning.determinism import enable_determinism  # noqa: E402
from metalight.models import MLP  # noqa: E402

BATCHES_PER_EPOCH = 7
CKPT_EVERY = 5


class Progress(Callback):
    """Appends one flushed line per outer step and per validation to a file."""

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--progress", type=Path, default=None)
    parser.add_argument("--max-steps", type=int, default=16)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stall-at", type=int, default=-1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    enable_determinism(0)
    module = HyperLR(
        MLP(in_features=64, hidden=[16], out_features=10),
        inner_optim=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        inner_steps=4,
        truncate=3,
        checkpoint_unroll=True,
        restart_every=4,
        init="random",
        schedule=2,
        outer_optim=functools.partial(torch.optim.Adam, lr=0.05),
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3, gamma=0.9),
        baseline_lrs=[0.1],
        batch_size=8,
    )
    data = DigitsDataModule(
        inner_steps=4,
        batch_size=8,
        val_batch_size=16,
        train_size=200,
        val_size=100,
        test_size=100,
        train_batches_per_epoch=BATCHES_PER_EPOCH,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoints = ModelCheckpoint(
        dirpath=args.out / "checkpoints", every_n_train_steps=CKPT_EVERY, save_last=True
    )
    progress = Progress(args.progress or args.out / "progress.txt", args.stall_at)
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
        callbacks=[progress, checkpoints],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, datamodule=data, ckpt_path="last" if args.resume else None)
    (test,) = trainer.test(module, datamodule=data, verbose=False)
    inner: dict[str, Any] = {}
    module.on_save_checkpoint(inner)
    result = {
        "global_step": trainer.global_step,
        "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "inner": inner,
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "test": test,
    }
    buffer = io.BytesIO()
    torch.save(result, buffer)
    atomic_write(args.out / "result.pt", buffer.getvalue())
    progress.file.close()


if __name__ == "__main__":
    main()
