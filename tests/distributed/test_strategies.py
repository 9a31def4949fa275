"""``check_strategy``: which Lightning strategies a meta-learning run accepts (in-process).

Nothing here starts a process group: the trainers are only constructed. The end-to-end
refusal of a real FSDP fit is in ``test_ddp.py`` (a subprocess, since FSDP's start-up
initialises ``torch.distributed``).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    ParallelStrategy,
    SingleDeviceStrategy,
)

from metalight.lightning.strategies import check_strategy


def cpu_trainer(strategy: Any, devices: int = 2) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.mark.parametrize(
    "name",
    [
        "ddp",
        "ddp_spawn",
        "ddp_fork",
        "ddp_notebook",
        "ddp_find_unused_parameters_false",
        "ddp_find_unused_parameters_true",
        "ddp_spawn_find_unused_parameters_true",
    ],
)
def test_ddp_strategies_are_accepted(name: str) -> None:
    trainer = cpu_trainer(name)
    assert isinstance(trainer.strategy, DDPStrategy)
    check_strategy(trainer)


def test_single_device_is_accepted() -> None:
    trainer = cpu_trainer("auto", devices=1)
    assert isinstance(trainer.strategy, SingleDeviceStrategy)
    check_strategy(trainer)


def test_no_strategy_is_not_checked() -> None:
    check_strategy(SimpleNamespace())
    check_strategy(SimpleNamespace(strategy=None))


class CPUFSDPStrategy(FSDPStrategy):
    """A user subclass: the check goes by class, subclasses included."""


def _deepspeed() -> DeepSpeedStrategy:
    # DeepSpeed is not installed here and its constructor refuses to run without it; the
    # check only looks at the class (DeepSpeedStrategy subclasses DDPStrategy, so the order
    # of the checks matters).
    return DeepSpeedStrategy.__new__(DeepSpeedStrategy)


@pytest.mark.parametrize(
    ("make", "name", "why"),
    [
        (FSDPStrategy, "FSDPStrategy", "FSDP shards the parameters"),
        (CPUFSDPStrategy, "CPUFSDPStrategy", "FSDP shards the parameters"),
        (_deepspeed, "DeepSpeedStrategy", "DeepSpeed (ZeRO) partitions"),
        (ModelParallelStrategy, "ModelParallelStrategy", "shards the parameters"),
    ],
)
def test_sharded_strategies_are_refused_with_what_to_use(make: Any, name: str, why: str) -> None:
    # Lightning itself refuses FSDP on a CPU accelerator when the Trainer is built
    # (test_lightning_refuses_fsdp_on_cpu_first), so a stand-in holds the real strategy.
    with pytest.raises(ValueError, match=rf"^{name} cannot train a MetaLearningModule") as info:
        check_strategy(SimpleNamespace(strategy=make()))
    message = str(info.value)
    assert why in message
    assert "torch.autograd.grad" in message
    assert "wrong or failing meta-gradients" in message
    assert "strategy='ddp'" in message


class OtherParallelStrategy(ParallelStrategy):
    """A multi-process strategy the library knows nothing about."""

    def __init__(self) -> None:  # the abstract base needs nothing for this check
        pass

    root_device = torch.device("cpu")  # type: ignore[assignment]

    def all_gather(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        raise NotImplementedError

    def model_to_device(self) -> None:
        raise NotImplementedError

    def reduce(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


def test_unknown_parallel_strategies_are_refused() -> None:
    with pytest.raises(ValueError, match=r"^OtherParallelStrategy is not supported") as info:
        check_strategy(SimpleNamespace(strategy=OtherParallelStrategy()))
    assert "strategy='ddp'" in str(info.value)


def test_lightning_refuses_fsdp_on_cpu_first() -> None:
    # Documents why the FSDP tests use a stand-in or a subclass: on CPU, Lightning stops
    # `strategy="fsdp"` before any of our hooks run.
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        cpu_trainer("fsdp", devices=1)
