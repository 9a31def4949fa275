"""The inner loop of a bilevel problem: k differentiable optimizer steps, as pure functions.

The meta-parameters are explicit inputs (``meta``): the inner loss and the per-parameter
hyperparameters are functions of ``(meta, step)``, so the same loop serves learned learning
rates and weight decay, per-example weights, synthetic training data or a learned loss. Three
policies, all over the pure functional optimizers of :mod:`metalight.optim.functional`:

* plain: every step keeps its graph (second order through the whole unroll);
* truncated (``truncate=T``): the first ``k - T`` steps run without any graph and the
  hypergradient flows through the last ``T`` steps only (truncated back-propagation, Shaban
  et al., 2019); the optimizer state carries across the boundary, and ``T = k`` is the plain
  unroll;
* checkpointed: each differentiable step keeps only its inputs (weights, optimizer state,
  meta-parameters) and is recomputed in the backward pass, so memory grows with ``k`` only by
  those inputs.

Example:
    >>> import torch
    >>> from metalight.bilevel.unroll import unroll
    >>> from metalight.optim.functional import sgd
    >>> w = [torch.zeros(3, dtype=torch.float64)]
    >>> log_lr = torch.zeros((), dtype=torch.float64, requires_grad=True)
    >>> loss = lambda params, meta, step: ((params[0] - 1) ** 2).sum()
    >>> hypers = lambda meta, step: [{"lr": 0.1 * meta[0].exp()}]
    >>> result = unroll(sgd, w, sgd.init(w), loss, hypers, 5, meta=[log_lr], checkpoint=True)
    >>> outer = ((result.params[0] - 1) ** 2).sum()
    >>> bool(torch.autograd.grad(outer, log_lr)[0] < 0)  # a larger step would help
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metalight.optim.functional import FunctionalOptimizer

__all__ = ["HyperFn", "InnerLossFn", "UnrollResult", "unroll", "update_per_parameter"]

InnerLossFn = Callable[[list[Tensor], Sequence[Tensor], int], Tensor]
"""``(params, meta, step) -> loss``: the inner (training) loss of step ``step``."""

HyperFn = Callable[[Sequence[Tensor], int], Sequence[Mapping[str, Any]]]
"""``(meta, step) -> one hyperparameter dict per parameter`` (``lr``, ``weight_decay``...)."""


class UnrollResult(NamedTuple):
    """What :func:`unroll` returns.

    Attributes:
        params: the weights after the last step (differentiable w.r.t. ``meta``).
        state: the optimizer state after the last step.
        losses: each step's inner loss, detached.
    """

    params: list[Tensor]
    state: Any
    losses: list[Tensor]


def update_per_parameter(
    opt: FunctionalOptimizer,
    grads: Sequence[Tensor | None],
    state: Any,
    params: Sequence[Tensor],
    hparams: Sequence[Mapping[str, Any]],
) -> tuple[list[Tensor], Any]:
    """One step of ``opt`` with its own hyperparameters for each parameter.

    Args:
        opt: a functional optimizer.
        grads: one gradient per parameter.
        state: ``opt``'s state for ``params``.
        params: the parameters.
        hparams: one hyperparameter dict per parameter (numbers or tensors).

    Returns:
        ``(new_params, new_state)``; nothing is modified in place.

    Raises:
        ValueError: when ``hparams`` does not hold one dict per parameter.
    """
    if len(hparams) != len(params):
        raise ValueError(
            f"the hyperparameter hook returned {len(hparams)} dicts for {len(params)} inner "
            "parameters; return one dict per parameter of the model"
        )
    if all(h is hparams[0] for h in hparams):
        return opt.update(grads, state, params, **hparams[0])
    new_params: list[Tensor] = []
    columns: dict[str, list[Any]] = {field: [] for field in state._fields}
    for i, (grad, param, hp) in enumerate(zip(grads, params, hparams, strict=True)):
        own = type(state)(*[[column[i]] for column in state])
        (new,), new_state = opt.update([grad], own, [param], **hp)
        new_params.append(new)
        for field in state._fields:
            columns[field].append(getattr(new_state, field)[0])
    return new_params, type(state)(**columns)


class _Slot(int):
    """Where a tensor of a flattened optimizer state goes back."""


def _flatten_state(state: Any) -> tuple[list[Tensor], Callable[[Sequence[Tensor]], Any]]:
    tensors: list[Tensor] = []
    layout: list[list[Any]] = []
    for column in state:
        slots: list[Any] = []
        for value in column:
            if isinstance(value, Tensor):
                slots.append(_Slot(len(tensors)))
                tensors.append(value)
            else:
                slots.append(value)
        layout.append(slots)

    def rebuild(new: Sequence[Tensor]) -> Any:
        return type(state)(
            *[[new[v] if isinstance(v, _Slot) else v for v in slots] for slots in layout]
        )

    return tensors, rebuild


def detach_state(state: Any) -> Any:
    """A copy of a functional optimizer state with every tensor detached."""
    return type(state)(
        *[[v.detach() if isinstance(v, Tensor) else v for v in column] for column in state]
    )


class _RecomputedStep(torch.autograd.Function):
    """One inner step that keeps only its inputs and rebuilds its graph in backward."""

    @staticmethod
    def forward(ctx: Any, run: Callable[..., tuple[Tensor, ...]], *inputs: Tensor) -> Any:
        ctx.run = run
        ctx.save_for_backward(*inputs)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
            outputs = run(leaves, create_graph=False)
        outputs = tuple(o.detach() for o in outputs)
        ctx.mark_non_differentiable(outputs[-1])
        return outputs

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> Any:
        inputs = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
            wrt = [t for t in leaves if t.requires_grad]
            outputs = ctx.run(leaves, create_graph=True)[:-1]
            pairs = [
                (o, g)
                for o, g in zip(outputs, grad_outputs[:-1], strict=True)
                if o.requires_grad and g is not None
            ]
            found = iter(
                torch.autograd.grad(
                    [o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True
                )
                if pairs and wrt
                else [None] * len(wrt)
            )
        return (None, *[next(found) if t.requires_grad else None for t in leaves])


def _as_leaves(params: Sequence[Tensor]) -> list[Tensor]:
    # The inner gradient is taken w.r.t. the weights, so each must require grad; weights
    # that already carry a graph (from earlier differentiable steps) keep it.
    return [p if p.requires_grad else p.detach().requires_grad_(True) for p in params]


def unroll(
    opt: FunctionalOptimizer,
    params: Sequence[Tensor],
    state: Any,
    inner_loss: InnerLossFn,
    hparams: HyperFn,
    steps: int,
    *,
    meta: Sequence[Tensor] = (),
    truncate: int | None = None,
    checkpoint: bool = False,
    first_step: int = 0,
) -> UnrollResult:
    """Run ``steps`` inner steps of ``opt`` whose result is differentiable w.r.t. ``meta``.

    Args:
        opt: the functional optimizer (:data:`metalight.optim.functional.BY_TORCH_CLASS`).
        params: the starting weights (their history is cut: the hypergradient goes to
            ``meta`` only).
        state: ``opt``'s state for ``params`` (carried over from an earlier unroll, or
            ``opt.init(params, ...)``).
        inner_loss: ``(params, meta, step) -> loss``. With ``checkpoint=True`` it runs again
            in the backward pass, so it must have no side effects and take every tensor it
            should differentiate from ``meta`` (not from a closure).
        hparams: ``(meta, step) -> [dict per parameter]`` of optimizer hyperparameters.
        steps: the number of inner steps ``k``.
        meta: the meta-parameters (tensors that require grad).
        truncate: the hypergradient flows through the last ``truncate`` steps only; the
            earlier ones run without a graph. None: through all ``k``.
        checkpoint: recompute each differentiable step in the backward pass instead of
            keeping its activations.
        first_step: the number of the first step (the hooks see ``first_step ..
            first_step + steps - 1``), to continue an unroll in pieces.

    Returns:
        An :class:`UnrollResult`.

    Raises:
        ValueError: for ``steps < 0`` or a negative ``truncate``.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0 (inner steps), got {steps!r}")
    if truncate is not None and (not isinstance(truncate, int) or truncate < 0):
        raise ValueError(
            f"truncate must be None or an integer >= 0 (the last inner steps the hypergradient "
            f"flows through), got {truncate!r}"
        )
    meta = list(meta)
    current = [p.detach() for p in params]
    state = detach_state(state)
    losses: list[Tensor] = []
    first_graph_step = 0 if truncate is None else max(0, steps - truncate)
    for step in range(first_step, first_step + steps):
        if step - first_step < first_graph_step:
            current, state, loss = _graphless_step(
                opt, current, state, inner_loss, hparams, meta, step
            )
        elif checkpoint:
            current, state, loss = _recomputed_step(
                opt, current, state, inner_loss, hparams, meta, step
            )
        else:
            current, state, loss = _plain_step(
                opt, current, state, inner_loss, hparams, meta, step, create_graph=True
            )
        losses.append(loss.detach())
    return UnrollResult(current, state, losses)


def _plain_step(
    opt: FunctionalOptimizer,
    params: Sequence[Tensor],
    state: Any,
    inner_loss: InnerLossFn,
    hparams: HyperFn,
    meta: Sequence[Tensor],
    step: int,
    *,
    create_graph: bool,
) -> tuple[list[Tensor], Any, Tensor]:
    with torch.enable_grad():
        leaves = _as_leaves(params)
        loss = inner_loss(leaves, meta, step)
        grads = torch.autograd.grad(loss, leaves, create_graph=create_graph)
        new_params, new_state = update_per_parameter(opt, grads, state, leaves, hparams(meta, step))
    return new_params, new_state, loss


def _graphless_step(
    opt: FunctionalOptimizer,
    params: Sequence[Tensor],
    state: Any,
    inner_loss: InnerLossFn,
    hparams: HyperFn,
    meta: Sequence[Tensor],
    step: int,
) -> tuple[list[Tensor], Any, Tensor]:
    detached = [m.detach() for m in meta]
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_(True) for p in params]
        loss = inner_loss(leaves, detached, step)
        grads = torch.autograd.grad(loss, leaves)
    with torch.no_grad():
        new_params, new_state = update_per_parameter(
            opt, grads, state, [p.detach() for p in leaves], hparams(detached, step)
        )
    return [p.detach() for p in new_params], detach_state(new_state), loss.detach()


def _recomputed_step(
    opt: FunctionalOptimizer,
    params: Sequence[Tensor],
    state: Any,
    inner_loss: InnerLossFn,
    hparams: HyperFn,
    meta: Sequence[Tensor],
    step: int,
) -> tuple[list[Tensor], Any, Tensor]:
    n, n_meta = len(params), len(meta)
    state_tensors, rebuild = _flatten_state(state)
    structure: list[Callable[[Sequence[Tensor]], Any]] = []

    def run(inputs: Sequence[Tensor], create_graph: bool) -> tuple[Tensor, ...]:
        weights = [p.requires_grad_(True) if p.is_leaf else p for p in inputs[:n]]
        own_meta = list(inputs[n : n + n_meta])
        loss = inner_loss(weights, own_meta, step)
        grads = torch.autograd.grad(loss, weights, create_graph=create_graph)
        new_params, new_state = update_per_parameter(
            opt, grads, rebuild(inputs[n + n_meta :]), weights, hparams(own_meta, step)
        )
        new_tensors, new_rebuild = _flatten_state(new_state)
        if not structure:
            structure.append(new_rebuild)
        return (*new_params, *new_tensors, loss.detach())

    # Weights enter as graph inputs so that the recomputation can differentiate through
    # them, even at the first step after a cut (where they are detached).
    inputs = (*_as_leaves(params), *meta, *state_tensors)
    outputs = _RecomputedStep.apply(run, *inputs)
    return list(outputs[:n]), structure[0](outputs[n:-1]), outputs[-1]
