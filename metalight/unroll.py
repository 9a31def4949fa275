"""The inner loop context: a functional model and a differentiable optimizer together."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from metalight.functional import FunctionalModule, monkeypatch
from metalight.optim.differentiable import DifferentiableOptimizer, Override
from metalight.optim.registry import get_diff_optim

__all__ = ["UnrollPolicy", "innerloop_ctx"]


@dataclasses.dataclass(frozen=True)
class UnrollPolicy:
    """How much of a k-step unroll the meta-gradient flows through.

    Args:
        first_order: every step first-order (FOMAML): gradients carry no graph of their own,
            the fast weights stay differentiable w.r.t. the initial ones with identity
            Jacobians through each update.
        truncate: second order through the last ``truncate`` steps only; earlier steps run
            first-order (no higher-order graph is kept for them), and the optimizer state
            (momentum, Adam moments) carries across the boundary. None: all steps.

    Example:
        >>> from metalight.unroll import UnrollPolicy
        >>> policy = UnrollPolicy(truncate=2)
        >>> [policy.first_order_at(step, 5) for step in range(5)]
        [True, True, True, False, False]
    """

    first_order: bool = False
    truncate: int | None = None

    def __post_init__(self) -> None:
        if self.truncate is not None and (not isinstance(self.truncate, int) or self.truncate < 0):
            raise ValueError(
                f"truncate must be None or an integer >= 0 (the number of last inner steps the "
                f"meta-gradient flows through), got {self.truncate!r}"
            )

    def first_order_at(self, step: int, steps: int) -> bool:
        """Whether inner step ``step`` (0-based) of ``steps`` runs first-order."""
        if self.first_order:
            return True
        return self.truncate is not None and step < steps - self.truncate


@contextlib.contextmanager
def innerloop_ctx(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    override: Override | None = None,
    track_higher_grads: bool = True,
    *,
    detach_initial_weights: bool | None = None,
    first_order: bool = False,
    sync_buffers: bool = False,
    **kwargs: Any,
) -> Iterator[tuple[FunctionalModule, DifferentiableOptimizer]]:
    """Unroll an inner loop on ``model`` with a differentiable version of ``opt``.

    Args:
        model: the module to adapt; never modified (see ``sync_buffers``).
        opt: a ``torch.optim`` optimizer over ``model.parameters()``; its hyperparameters,
            groups and state are copied.
        device: put fast weights and state there.
        copy_initial_weights: higher's name; see ``detach_initial_weights``.
        override: hyperparameters replacing ``opt``'s, e.g. learnable ``{"lr": [t]}``.
        track_higher_grads: False gives a cheap test mode without higher-order graphs.
        detach_initial_weights: True: start from detached copies (meta-gradients reach
            ``fmodel.parameters(time=0)`` only). False: start from the module's own
            parameters, so ``meta_loss.backward()`` fills ``model``'s ``.grad`` (MAML).
            Overrides ``copy_initial_weights`` when given.
        first_order: first-order approximation (no second derivatives) for any optimizer.
        sync_buffers: on exit, write the unroll's buffers (BatchNorm running stats) into
            ``model``.
        **kwargs: passed to the differentiable optimizer (e.g. ``grad_callback``).

    Yields:
        ``(fmodel, diffopt)``.

    Example:
        >>> import torch
        >>> import metalight
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> mse = torch.nn.functional.mse_loss
        >>> ctx = metalight.innerloop_ctx(model, opt, copy_initial_weights=False)
        >>> with ctx as (fmodel, diffopt):
        ...     for _ in range(3):
        ...         _ = diffopt.step(mse(fmodel(x), y))
        ...     mse(fmodel(x), y).backward()
        >>> model.weight.grad.shape
        torch.Size([1, 4])
    """
    fmodel = monkeypatch(
        model,
        device=device,
        copy_initial_weights=copy_initial_weights,
        track_higher_grads=track_higher_grads,
        detach_initial_weights=detach_initial_weights,
    )
    diffopt = get_diff_optim(
        opt,
        model.parameters(),
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        first_order=first_order,
        **kwargs,
    )
    yield fmodel, diffopt
    if sync_buffers:
        fmodel.copy_buffers_to_module()
