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
  those inputs. The recomputed step is the few-shot engine's
  (:func:`metalight.optim.unroll.recomputed_step`), with the meta-parameters as its extra
  inputs: it replays each step on the module's buffers and modes and with the random numbers
  it ran with.

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

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from metalight.optim.functional import FunctionalOptimizer
from metalight.optim.unroll import recomputed_step

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


def detach_state(state: Any) -> Any:
    """A copy of a functional optimizer state with every tensor detached."""
    return type(state)(
        *[[v.detach() if isinstance(v, Tensor) else v for v in column] for column in state]
    )


_ModuleState = tuple[list[tuple[nn.Module, str, Tensor]], list[tuple[nn.Module, bool]]]
"""The buffers (owning submodule, name, copy) and each submodule's train/eval mode."""


def _copies(buffers: list[tuple[nn.Module, str, Tensor]]) -> list[tuple[nn.Module, str, Tensor]]:
    """Copies of the buffers; a tensor registered at several places stays one tensor."""
    copies: dict[int, Tensor] = {}
    for _, _, b in buffers:
        if id(b) not in copies:
            copies[id(b)] = b.detach().clone()
    return [(sub, name, copies[id(b)]) for sub, name, b in buffers]


class _ModuleView:
    """A module's buffers and train/eval modes, for a recomputed step to replay its calls.

    It is the :class:`~metalight.optim.unroll.Replayable` of a plain ``nn.Module`` that the
    inner loss calls (with ``torch.func.functional_call``, whose missing entries are the
    module's own buffers): a recomputation runs on copies of the buffers the step's forward
    pass found, swapped into the module and swapped back afterwards, so that neither the
    module's buffers nor tensors saved by other graphs are written to.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def view_state(self) -> _ModuleState:
        """Copies of the buffers (by owning submodule and name) and each submodule's mode."""
        buffers = [
            (sub, name, b)
            for sub in self.module.modules()
            for name, b in sub._buffers.items()
            if b is not None
        ]
        return _copies(buffers), [(sub, sub.training) for sub in self.module.modules()]

    @contextlib.contextmanager
    def replaying(self, state: _ModuleState) -> Iterator[None]:
        """Calls inside run on fresh copies of ``state``; afterwards the module's own are back.

        ``state`` itself is not changed, so a retained graph can be recomputed again.
        """
        buffers, modes = state
        own = [(sub, name, sub._buffers[name]) for sub, name, _ in buffers]
        own_modes = [(sub, sub.training) for sub, _ in modes]
        for sub, name, fresh in _copies(buffers):
            sub._buffers[name] = fresh
        for sub, mode in modes:
            sub.training = mode
        try:
            yield
        finally:
            for sub, name, b in own:
                sub._buffers[name] = b
            for sub, mode in own_modes:
                sub.training = mode


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
    module: nn.Module | None = None,
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
        module: the module ``inner_loss`` runs, if any. With ``checkpoint=True`` each step is
            recomputed on copies of its buffers and in its train/eval modes as the step's
            forward pass found them (BatchNorm running statistics and spectral norm's
            vectors move once per step, as in the plain unroll; a module put in eval mode
            for the outer loss gives the plain unroll's hypergradient). Dropout masks are
            replayed with or without it.

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
    view = None if module is None else _ModuleView(module)
    current = [p.detach() for p in params]
    state = detach_state(state)
    losses: list[Tensor] = []
    first_graph_step = 0 if truncate is None else max(0, steps - truncate)
    steps_of = _Steps(opt, inner_loss, hparams)
    for step in range(first_step, first_step + steps):
        if step - first_step < first_graph_step:
            current, state, loss = steps_of.graphless(step, current, state, meta)
        elif checkpoint:
            current, state, loss = steps_of.recomputed(step, current, state, meta, view)
        else:
            with torch.enable_grad():
                current, state, loss = steps_of.run(step, _as_leaves(current), state, meta, True)
        losses.append(loss.detach())
    return UnrollResult(current, state, losses)


class _Steps(NamedTuple):
    """One inner step of a problem, in each of the three policies."""

    opt: FunctionalOptimizer
    inner_loss: InnerLossFn
    hparams: HyperFn

    def run(
        self,
        step: int,
        weights: list[Tensor],
        state: Any,
        meta: Sequence[Tensor],
        create_graph: bool,
    ) -> tuple[list[Tensor], Any, Tensor]:
        """Loss, gradient and update on weights that require grad (the plain step)."""
        loss = self.inner_loss(weights, meta, step)
        grads = torch.autograd.grad(loss, weights, create_graph=create_graph)
        new_params, new_state = update_per_parameter(
            self.opt, grads, state, weights, self.hparams(meta, step)
        )
        return new_params, new_state, loss

    def graphless(
        self, step: int, params: Sequence[Tensor], state: Any, meta: Sequence[Tensor]
    ) -> tuple[list[Tensor], Any, Tensor]:
        """The step without any graph (before a truncation's cut)."""
        detached = [m.detach() for m in meta]
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(True) for p in params]
            new_params, new_state, loss = self.run(step, leaves, state, detached, False)
        return [p.detach() for p in new_params], detach_state(new_state), loss.detach()

    def recomputed(
        self,
        step: int,
        params: Sequence[Tensor],
        state: Any,
        meta: Sequence[Tensor],
        view: _ModuleView | None,
    ) -> tuple[list[Tensor], Any, Tensor]:
        """The step as one node that keeps its inputs and is recomputed in backward."""

        def run(
            weights: list[Tensor], states: list[Any], own_meta: list[Tensor], create_graph: bool
        ) -> tuple[list[Tensor], list[Any], Tensor]:
            new_params, new_state, loss = self.run(step, weights, states[0], own_meta, create_graph)
            return new_params, [new_state], loss

        # Weights enter as graph inputs that require grad, so that the recomputation
        # differentiates through them, even at the first step after a cut (where they are
        # detached): every weight given to the engine is trained.
        new_params, (new_state,), loss = recomputed_step(
            run, _as_leaves(params), [state], meta, view=view
        )
        return new_params, new_state, loss
