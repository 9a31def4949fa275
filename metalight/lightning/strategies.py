"""Which Lightning strategies a meta-learning run can use.

A meta-iteration differentiates each task's query loss through the inner loop with
``torch.autograd.grad`` on the *full* meta-parameters, then hands Lightning one surrogate loss
whose gradient is the accumulated meta-gradient. That works with every strategy that keeps a
full replica of the parameters in each process:

* one process (``SingleDeviceStrategy``: CPU, one GPU, ...);
* data parallel (``DDPStrategy`` and its registered aliases: ``ddp``, ``ddp_spawn``,
  ``ddp_fork``, ``ddp_notebook``, ``ddp_find_unused_parameters_{true,false}``, on one or many
  nodes, launched by Lightning, ``torchrun`` or SLURM). Each rank adapts its shard of the
  meta-batch; the single outer backward all-reduces (averages) the meta-gradient once per
  step, and every meta-parameter receives a gradient, so DDP's unused-parameter detection
  is never triggered.

Strategies that shard parameters, gradients or optimizer state (FSDP, DeepSpeed ZeRO, tensor
or model parallelism) are refused at start-up: the inner loop would differentiate local
shards (or flattened views) instead of the parameters, and the strategy's own backward and
reduction would not see the per-task gradients, giving wrong or failing meta-gradients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["check_strategy"]

_USE_INSTEAD = (
    "Use data-parallel training instead: strategy='ddp' (lightning.Trainer(strategy='ddp'); "
    "or 'ddp_spawn' / 'ddp_notebook' where processes "
    "cannot be re-launched); it keeps a full model per process, shards the meta-batch over "
    "the processes and averages the meta-gradients. If memory is why you shard, "
    "first_order=True or truncate=... shortens the unrolled graph instead."
)

# Checked in order, before the allowed ones: DeepSpeedStrategy subclasses DDPStrategy.
_REFUSED: tuple[tuple[type[Strategy], str], ...] = (
    (
        FSDPStrategy,
        "FSDP shards the parameters over the processes and gathers them only inside its own "
        "forward and backward",
    ),
    (
        DeepSpeedStrategy,
        "DeepSpeed (ZeRO) partitions optimizer state, gradients or parameters and runs its "
        "own backward and gradient reduction",
    ),
    (
        ModelParallelStrategy,
        "ModelParallelStrategy shards the parameters (FSDP2 / tensor parallelism) into "
        "distributed tensors",
    ),
)

_ALLOWED: tuple[type[Strategy], ...] = (SingleDeviceStrategy, DDPStrategy)


def check_strategy(trainer: pl.Trainer | Any) -> None:
    """Refuse strategies that would give wrong meta-gradients, with what to use instead.

    Called from :meth:`MetaLearningModule.setup`, i.e. in every process at the start of
    ``fit``/``validate``/``test``, before any parameter is wrapped or sharded. The decision
    is made on the strategy's class (subclasses included), not on its registered name.

    Args:
        trainer: The Lightning ``Trainer`` (anything with a ``strategy`` attribute).
            Without a strategy (a bare module, a stand-in trainer) nothing is checked.

    Raises:
        ValueError: If the strategy shards parameters, gradients or optimizer state (FSDP,
            DeepSpeed, ModelParallel), or is a multi-process strategy this library does not
            know to keep full parameter replicas. The message says why and names
            ``strategy='ddp'`` as the replacement.

    Example:
        >>> from types import SimpleNamespace
        >>> from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
        >>> check_strategy(SimpleNamespace(strategy=DDPStrategy()))
        >>> check_strategy(SimpleNamespace(strategy=FSDPStrategy()))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: FSDPStrategy cannot train a MetaLearningModule: ...
    """
    strategy = getattr(trainer, "strategy", None)
    if strategy is None:
        return
    name = type(strategy).__name__
    why = (
        "the inner loop differentiates each task's loss with respect to the full "
        "meta-parameters (torch.autograd.grad through the unroll), outside the strategy's "
        "backward; with sharded parameters that gives wrong or failing meta-gradients"
    )
    for refused, what in _REFUSED:
        if isinstance(strategy, refused):
            raise ValueError(
                f"{name} cannot train a MetaLearningModule: {what}, but {why}. {_USE_INSTEAD}"
            )
    if isinstance(strategy, _ALLOWED):
        return
    raise ValueError(
        f"{name} is not supported by MetaLearningModule: only strategies that keep a full "
        f"copy of the parameters in every process (single device, or DDPStrategy and its "
        f"subclasses) are known to give correct meta-gradients, because {why}. "
        f"{_USE_INSTEAD}"
    )
