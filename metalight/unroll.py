"""The inner loop context: a functional model and a differentiable optimizer together."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from metalight.functional import FunctionalModule, monkeypatch
from metalight.optim.differentiable import DifferentiableOptimizer
from metalight.optim.registry import get_diff_optim

# The loop and its policies live below the optimizers (metalight.optim.unroll); their old
# home keeps the names, so `from metalight.unroll import UnrollPolicy, run_unroll` works.
from metalight.optim.unroll import Override, UnrollPolicy, checkpointed_unroll, run_unroll

__all__ = ["UnrollPolicy", "checkpointed_unroll", "innerloop_ctx", "run_unroll"]


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
    truncate: int | None = None,
    checkpoint: bool = False,
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
        truncate: with :meth:`~DifferentiableOptimizer.unroll`, the meta-gradient flows
            through the last ``truncate`` inner steps only (see :class:`UnrollPolicy`).
        checkpoint: with :meth:`~DifferentiableOptimizer.unroll`, recompute each step's
            activations in the backward pass instead of storing them (built-in optimizers).
            With either, ``diffopt.step(loss)`` refuses to run: use ``diffopt.unroll``.
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

        A long unroll with truncated backpropagation and recomputed activations:

        >>> ctx = metalight.innerloop_ctx(
        ...     model, opt, copy_initial_weights=False, truncate=10, checkpoint=True
        ... )
        >>> with ctx as (fmodel, diffopt):
        ...     _ = diffopt.unroll(lambda params: mse(fmodel(x, params=params), y), steps=100)
        ...     mse(fmodel(x), y).backward()

    Raises:
        TypeError: ``checkpoint=True`` with an optimizer that has no pure functional core.
    """
    policy = UnrollPolicy(first_order=first_order, truncate=truncate, checkpoint=checkpoint)
    fmodel = monkeypatch(
        model,
        device=device,
        copy_initial_weights=copy_initial_weights,
        track_higher_grads=track_higher_grads,
        detach_initial_weights=detach_initial_weights,
    )
    diffopt = get_diff_optim(
        opt,
        fmodel.module_parameters,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        first_order=first_order,
        **kwargs,
    )
    if checkpoint and not diffopt.supports_pure_step:
        raise TypeError(
            f"checkpoint=True needs a built-in differentiable optimizer with a pure functional "
            f"core; {type(diffopt).__name__} updates in place (its _update would run twice when "
            "a step is recomputed). Open the loop without checkpoint=True for custom optimizers."
        )
    diffopt.unroll_policy = policy
    yield fmodel, diffopt
    if sync_buffers:
        fmodel.copy_buffers_to_module()
