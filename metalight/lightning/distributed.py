"""How the ranks of a distributed run agree on one meta-step.

DDP averages the ranks' gradients in one all-reduce that every rank must join with every
parameter. So the ranks agree, with small collectives, on what the meta-step does: whether any
rank met a non-finite value (:func:`on_any_rank`), how many tasks were kept in all
(:func:`global_counts`), and which meta-parameters no rank used (:func:`used_on_any_rank`).
:func:`meta_gradient_surrogate` turns a meta-gradient gathered task by task into the scalar
whose one backward pass (one all-reduce) applies it.

Outside a Trainer, or with one process, every function answers from this rank alone.

Example:
    >>> import torch
    >>> from metalight.lightning.distributed import global_counts, meta_gradient_surrogate
    >>> global_counts(None, 3, 4, torch.device("cpu"))
    (3, 4)
    >>> weight = torch.nn.Parameter(torch.ones(2))
    >>> loss = meta_gradient_surrogate([weight], [torch.tensor([0.5, 2.0])], torch.tensor(7.0))
    >>> loss.item()
    7.0
    >>> loss.backward()
    >>> weight.grad
    tensor([0.5000, 2.0000])
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor, nn

from metalight.lightning.finite import NonFiniteError

__all__ = [
    "global_counts",
    "is_distributed",
    "merge_used",
    "meta_gradient_surrogate",
    "on_any_rank",
    "raise_on_any_rank",
    "used_on_any_rank",
]


def is_distributed(trainer: L.Trainer | None) -> bool:
    """Whether ``trainer`` runs more than one process (False without a Trainer)."""
    return trainer is not None and trainer.world_size > 1


def on_any_rank(trainer: L.Trainer | None, flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (one reduced scalar; every rank must call it)."""
    if not is_distributed(trainer):
        return flag
    assert trainer is not None
    count = torch.tensor([float(flag)], device=device)
    return bool(trainer.strategy.reduce(count, reduce_op="sum").item() > 0)


def raise_on_any_rank(
    trainer: L.Trainer | None, failure: NonFiniteError | None, batch_idx: int, device: torch.device
) -> None:
    """Raise ``failure`` on every rank if any rank has one (every rank must call it).

    A rank that raised alone would leave the others waiting in the gradient all-reduce: the
    ranks agree on a failure (one flag reduced), and all raise, a rank without its own with
    an error that points to the one that has it.
    """
    if on_any_rank(trainer, failure is not None, device) and failure is None:
        failure = NonFiniteError(
            f"batch {batch_idx}: another process met a non-finite value "
            "(nan_policy='raise'); its error names the task and the inner step"
        )
    if failure is not None:
        raise failure


def global_counts(
    trainer: L.Trainer | None, kept: int, total: int, device: torch.device
) -> tuple[int, int]:
    """The kept and total task counts summed over the ranks (every rank must call it)."""
    if not is_distributed(trainer):
        return kept, total
    assert trainer is not None
    counts = torch.tensor([float(kept), float(total)], device=device)
    counts = trainer.strategy.reduce(counts, reduce_op="sum")
    return int(counts[0].item()), int(counts[1].item())


def merge_used(previous: list[bool] | None, grads: Sequence[Tensor | None]) -> list[bool]:
    """Which meta-parameters got a meta-gradient: in ``grads`` or in ``previous`` batches."""
    used = [g is not None for g in grads]
    if previous is None:
        return used
    return [a or b for a, b in zip(previous, used, strict=True)]


def used_on_any_rank(
    trainer: L.Trainer | None, used: Sequence[bool], device: torch.device
) -> list[bool]:
    """Which meta-parameters some rank used (one reduced vector; every rank must call it)."""
    flags = torch.tensor([float(u) for u in used], device=device)
    if is_distributed(trainer):
        assert trainer is not None
        flags = trainer.strategy.reduce(flags, reduce_op="sum")
    return [flag != 0 for flag in flags.tolist()]


def meta_gradient_surrogate(
    meta_params: Sequence[nn.Parameter],
    grads: Sequence[Tensor | None],
    value: Tensor,
    *,
    distributed: bool = False,
) -> Tensor:
    """A scalar equal to ``value`` whose gradient with respect to ``meta_params`` is ``grads``.

    Args:
        meta_params: the meta-parameters.
        grads: their meta-gradients, gathered task by task; None for one no task used.
        value: the meta-loss the scalar reports (for logging).
        distributed: every parameter takes part in the backward pass (DDP's reducer waits
            for each), with a zero gradient where ``grads`` holds None.

    Returns:
        ``sum(p * g) + (value - sum(p * g).detach())``: its backward applies ``grads``.
    """
    # d/dp of sum(p * g) is g: one backward (one DDP all-reduce) applies the meta-gradient
    # gathered task by task. A parameter with no meta-gradient stays out of the graph, so its
    # .grad stays None as in plain torch, and torch.optim skips it (no weight decay, no
    # momentum drift); under DDP it gets a zero, which the caller turns back to None where no
    # rank used it (used_on_any_rank).
    terms = [
        (p * (g if g is not None else torch.zeros_like(p)).to(p.dtype)).sum()
        for p, g in zip(meta_params, grads, strict=True)
        if g is not None or distributed
    ]
    if not terms:  # nothing to learn from this batch: the optimizer skips every parameter
        surrogate = torch.zeros((), device=value.device, requires_grad=True)
    else:
        surrogate = torch.stack([t.float() for t in terms]).sum()
    return surrogate + (value.float() - surrogate.detach())
