"""Runs tiny meta-learning jobs in real processes for the distributed tests.

Launched by ``test_ddp.py`` as ``python tests/distributed/_ddp_run.py --out DIR --devices N
--strategy S --jobs JSON`` (or under ``torchrun``). Each job builds a fixed-seed MAML, ANIL
or (``"algo": "skip"``) MAML with ``nan_policy="skip"`` and a NaN inner loss on some tasks,
and a ``SinusoidDataModule``, fits for ``steps`` outer steps (optionally resuming from
a checkpoint and/or saving one every ``ckpt_every`` steps), validates at every epoch end,
optionally tests, and writes:

* ``DIR/<job>/rank<r>.pt`` from every rank: the tasks and the DDP communication-hook calls
  of every outer step, the validation metrics logged during fit, and the global steps at
  which fit started and ended;
* ``DIR/<job>/result.pt`` from global rank 0: the initial and final meta-parameters and the
  test metrics;
* ``DIR/<job>/skipped<r>.txt`` from every rank of a ``skip`` job: its count of skipped tasks.

A job ``{"fsdp": true}`` instead starts a fit with a real ``FSDPStrategy`` (subclass) and
records the error our start-up check raises; it must come last (it leaves a process group).
"""

import argparse
import functools
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from metalight.algorithms import ANIL, MAML
from metalight.data import SinusoidDataModule
from metalight.lightning import MetaLearningModule
from metalight.models import MLP

BATCHES_PER_EPOCH = 3
# Tiny buckets (a few hundred bytes; the MLP has 321 parameters), so that one backward is
# reduced in several buckets and the test must count reduction *rounds*, not hook calls.
BUCKET_CAP_MB = 0.0003


# Tasks whose support targets reach this magnitude get a NaN inner loss (job "skip").
POISON = 3.5


class PoisonedMAML(MAML):
    """MAML with nan_policy="skip" whose inner loss is NaN on some tasks, chosen by content.

    The choice depends only on the task, so a 2-process run poisons the same tasks as a
    1-process run; ``skipped`` counts this process's skipped tasks.
    """

    skipped = 0

    def inner_loss(self, output: torch.Tensor, target: torch.Tensor, task: Any) -> torch.Tensor:
        loss = super().inner_loss(output, target, task)
        # torch.where, not `if`: the task-vectorised step runs this under vmap.
        poisoned = task.support_y.abs().amax() >= POISON
        return torch.where(poisoned, torch.full_like(loss, float("nan")), loss)

    def _warn_skipped(self, index: int, batch_idx: int, err: Exception) -> None:
        type(self).skipped += 1
        super()._warn_skipped(index, batch_idx, err)


def make_module(algo: str) -> MetaLearningModule:
    torch.manual_seed(0)
    model = MLP(hidden=(16, 16))
    kwargs: dict[str, Any] = dict(
        inner_optim=functools.partial(torch.optim.SGD, lr=0.05),
        inner_steps=2,
        eval_inner_steps=3,
        outer_optim=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
    )
    if algo == "skip":
        return PoisonedMAML(model, nan_policy="skip", **kwargs)
    return ANIL(model, **kwargs) if algo == "anil" else MAML(model, **kwargs)


def make_datamodule() -> SinusoidDataModule:
    return SinusoidDataModule(
        shots=5,
        queries=5,
        meta_batch_size=4,
        train_batches_per_epoch=BATCHES_PER_EPOCH,
        val_episodes=8,
        test_episodes=8,
        eval_meta_batch_size=4,
        seed=0,
    )


class Recorder(Callback):
    """Counts DDP gradient reductions per outer step and keeps what fit logged."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.steps: list[dict[str, Any]] = []
        self.val: list[dict[str, Any]] = []
        self.ddp = False
        self.find_unused: bool | None = None
        self.start_step = -1
        self.end_step = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = trainer.strategy.model
        self.ddp = isinstance(model, DistributedDataParallel)
        if self.ddp:
            assert isinstance(model, DistributedDataParallel)
            self.find_unused = bool(model.find_unused_parameters)
            # Lightning registers DDP communication hooks on CUDA only; on CPU we do it here,
            # after the model is wrapped and before its first backward.
            model.register_comm_hook(self, counting_allreduce_hook)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # The tasks (amplitude, phase) this rank trains on, to check the sharding.
        info = batch.info.detach().clone()
        self.steps.append({"global_step": trainer.global_step, "tasks": info, "buckets": []})

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.val.append({"global_step": trainer.global_step, "metrics": metrics})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.end_step = trainer.global_step
        record = {
            "ddp": self.ddp,
            "find_unused_parameters": self.find_unused,
            "world_size": trainer.world_size,
            "num_meta_params": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            "steps": self.steps,
            "val": self.val,
            "start_step": self.start_step,
            "end_step": self.end_step,
        }
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


def counting_allreduce_hook(
    state: Recorder, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP's default all-reduce (mean over ranks), recording each bucket it reduces.

    DDP checks these annotations at registration, so this file evaluates them eagerly (no
    ``from __future__ import annotations``).
    """
    if state.steps:
        state.steps[-1]["buckets"].append(
            {
                "index": bucket.index(),
                "is_last": bucket.is_last(),
                "numel": sum(p.numel() for p in bucket.parameters()),
            }
        )
    return allreduce_hook(None, bucket)  # type: ignore[arg-type]


class CPUFSDPStrategy(FSDPStrategy):
    """A real FSDP strategy; Lightning's "FSDP needs a GPU" guard checks the exact type only.

    Subclassing gets past that guard on CPU, so the fit reaches our own start-up check.
    """


def make_strategy(name: str) -> str | DDPStrategy:
    if name == "auto":
        return "auto"
    if name not in ("ddp", "ddp_spawn"):
        raise ValueError(f"unknown strategy {name!r}")
    return DDPStrategy(
        start_method="spawn" if name == "ddp_spawn" else "popen",
        process_group_backend="gloo",
        bucket_cap_mb=BUCKET_CAP_MB,
    )


def trainer_kwargs(steps: int) -> dict[str, Any]:
    return dict(
        accelerator="cpu",
        max_steps=steps,
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1,
    )


def run_job(job: dict[str, Any], devices: int, strategy: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    module = make_module(job.get("algo", "maml"))
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    datamodule = make_datamodule()
    recorder = Recorder(out)
    callbacks: list[Callback] = [recorder]
    if job.get("ckpt_every"):
        callbacks.append(
            ModelCheckpoint(
                dirpath=out / "ckpt",
                filename="{step}",
                every_n_train_steps=job["ckpt_every"],
                save_top_k=-1,
            )
        )
    trainer = L.Trainer(
        devices=devices,
        strategy=make_strategy(strategy),
        callbacks=callbacks,
        enable_checkpointing=bool(job.get("ckpt_every")),
        **trainer_kwargs(job["steps"]),
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=job.get("resume"))
    tested = trainer.test(module, datamodule=datamodule, verbose=False) if job.get("test") else []
    if trainer.global_rank == 0:
        result = {
            "initial": initial,
            "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "test": {k: float(v) for k, v in tested[0].items()} if tested else None,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
        }
        torch.save(result, out / "result.pt")
    if job.get("algo") == "skip":
        # Every rank's count of skipped tasks, so the test can check the global number.
        (out / f"skipped{trainer.global_rank}.txt").write_text(str(PoisonedMAML.skipped))


def run_fsdp_refusal(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    trainer = L.Trainer(
        devices=1, strategy=CPUFSDPStrategy(), enable_checkpointing=False, **trainer_kwargs(2)
    )
    try:
        trainer.fit(make_module("maml"), datamodule=make_datamodule())
    except ValueError as err:
        (out / "error.txt").write_text(f"{type(err).__name__}: {err}")
    else:
        (out / "error.txt").write_text("no error")


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--jobs", required=True, help="JSON list of job dicts")
    args = parser.parse_args()
    for job in json.loads(args.jobs):
        if job.get("fsdp"):
            run_fsdp_refusal(args.out / job["name"])
        else:
            run_job(job, args.devices, args.strategy, args.out / job["name"])
    # Tear the process group down before the interpreter exits: gloo's threads still alive
    # at exit abort a process now and then ("terminate called without an active exception").
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
