"""The inner loop context: a functional model and a differentiable optimizer together."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metalight.functional import FunctionalModule, monkeypatch
from metalight.optim.differentiable import (
    DifferentiableOptimizer,
    FunctionalCoreOptimizer,
    Override,
)
from metalight.optim.registry import get_diff_optim

__all__ = ["UnrollPolicy", "checkpointed_unroll", "innerloop_ctx", "run_unroll"]


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
        checkpoint: recompute each inner step's activations in the backward pass instead
            of storing them: memory grows with the number of steps only by the fast
            weights and optimizer state. Needs a built-in (functional-core) optimizer.

    Example:
        >>> from metalight.unroll import UnrollPolicy
        >>> policy = UnrollPolicy(truncate=2)
        >>> [policy.first_order_at(step, 5) for step in range(5)]
        [True, True, True, False, False]
    """

    first_order: bool = False
    truncate: int | None = None
    checkpoint: bool = False

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
    if checkpoint and not isinstance(diffopt, FunctionalCoreOptimizer):
        raise TypeError(
            f"checkpoint=True needs a built-in differentiable optimizer with a pure functional "
            f"core; {type(diffopt).__name__} updates in place (its _update would run twice when "
            "a step is recomputed). Open the loop without checkpoint=True for custom optimizers."
        )
    diffopt.unroll_policy = policy
    yield fmodel, diffopt
    if sync_buffers:
        fmodel.copy_buffers_to_module()


class _RecomputedStep(torch.autograd.Function):
    """One inner step that keeps only its inputs and recomputes its graph in backward."""

    @staticmethod
    def forward(ctx: Any, run: Callable[..., tuple[Tensor, ...]], *inputs: Tensor) -> Any:
        ctx.run = run
        ctx.save_for_backward(*inputs)
        with torch.enable_grad():
            # The forward pass needs first-order gradients only, and no graph survives it.
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
            outputs = ctx.run(leaves, create_graph=True)[:-1]
            pairs = [
                (o, g)
                for o, g in zip(outputs, grad_outputs[:-1], strict=True)
                if o.requires_grad and g is not None
            ]
            wrt = [t for t in leaves if t.requires_grad]
            found = iter(
                torch.autograd.grad(
                    [o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True
                )
                if pairs and wrt
                else [None] * len(wrt)
            )
        return (None, *[next(found) if t.requires_grad else None for t in leaves])


def _flatten_hypers(
    hypers: list[dict[str, Any]],
) -> tuple[list[Tensor], Callable[[Sequence[Tensor]], list[dict[str, Any]]]]:
    """Tensor hyperparameters (learnable rates) as explicit inputs of a recomputed step."""
    tensors: list[Tensor] = []
    layout: list[dict[str, Any]] = []
    for hyper in hypers:
        entry: dict[str, Any] = {}
        for key, value in hyper.items():
            if isinstance(value, Tensor):
                entry[key] = _Slot(len(tensors))
                tensors.append(value)
            elif isinstance(value, tuple) and any(isinstance(v, Tensor) for v in value):
                slots = []
                for v in value:
                    if isinstance(v, Tensor):
                        slots.append(_Slot(len(tensors)))
                        tensors.append(v)
                    else:
                        slots.append(v)
                entry[key] = tuple(slots)
            else:
                entry[key] = value
        layout.append(entry)

    def rebuild(new: Sequence[Tensor]) -> list[dict[str, Any]]:
        def put(v: Any) -> Any:
            if isinstance(v, _Slot):
                return new[v]
            if isinstance(v, tuple):
                return tuple(put(x) for x in v)
            return v

        return [{k: put(v) for k, v in entry.items()} for entry in layout]

    return tensors, rebuild


class _Slot(int):
    """Marks where a tensor of a flattened optimizer state goes back."""


def _flatten_state(
    states: list[Any],
) -> tuple[list[Tensor], Callable[[Sequence[Tensor]], list[Any]]]:
    """Tensors of NamedTuple group states, and a function that puts tensors back."""
    tensors: list[Tensor] = []
    layout = []
    for state in states:
        fields = []
        for values in state:
            slots: list[Any] = []
            for v in values:
                if isinstance(v, Tensor):
                    slots.append(_Slot(len(tensors)))
                    tensors.append(v)
                else:
                    slots.append(v)
            fields.append(slots)
        layout.append((type(state), fields))

    def rebuild(new: Sequence[Tensor]) -> list[Any]:
        return [
            state_type(
                *[[new[v] if isinstance(v, _Slot) else v for v in slots] for slots in fields]
            )
            for state_type, fields in layout
        ]

    return tensors, rebuild


def checkpointed_unroll(
    fmodel: FunctionalModule,
    diffopt: DifferentiableOptimizer,
    support_loss: Callable[[list[Tensor]], Tensor],
    steps: int,
    *,
    override: Callable[[int], Override | None] | None = None,
    first_order_at: Callable[[int], bool] | None = None,
    on_loss: Callable[[Tensor, int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> None:
    """Unroll ``steps`` differentiable steps, recomputing each step's graph in backward.

    Each step but the last (inner forward, gradient, optimizer update) is one autograd node
    that keeps only its inputs (fast weights, optimizer state, tensor hyperparameters): the
    forward pass builds no second-order graph for it, and the backward pass rebuilds one
    step's graph at a time. The last step keeps its graph, as the backward pass needs it
    first. Peak memory is about two steps' graphs plus ``steps`` copies of the fast weights
    and optimizer state; time about one extra forward-and-gradient pass per step.
    The meta-gradient equals the plain unroll's. Higher-order derivatives of the meta-loss
    (a gradient of the meta-gradient) are not available through it, and running BatchNorm
    statistics are updated again when a step is recomputed.

    Args:
        fmodel: the functional model; its fast weights are advanced.
        diffopt: a built-in differentiable optimizer (pure functional core).
        support_loss: the inner loss as a function of the fast weights (no side effects:
            it runs again in the backward pass).
        steps: number of inner steps.
        override: hyperparameters of each step (e.g. learnable learning rates).
        first_order_at: whether a step runs first-order (truncated unrolls).
        on_loss: called with each step's detached inner loss (NaN checks).
        after_step: called with the number of steps done.

    Raises:
        TypeError: for an optimizer without a pure functional core.
    """
    if not isinstance(diffopt, FunctionalCoreOptimizer):
        raise TypeError(
            f"the checkpointed unroll needs a built-in differentiable optimizer with a pure "
            f"functional core; {type(diffopt).__name__} updates in place (its _update would run "
            "twice when recomputed). Use the plain unroll for custom optimizers."
        )
    params = list(fmodel.fast_params or [])
    n = len(params)
    states = diffopt.group_states(params)
    for step in range(steps):
        if override is not None and (values := override(step)) is not None:
            diffopt._apply_override(values)
        hyper_tensors, hypers = _flatten_hypers(diffopt.hyperparameters())
        first_order = bool(first_order_at(step)) if first_order_at is not None else False
        state_tensors, rebuild = _flatten_state(states)
        structure: list[Callable[[Sequence[Tensor]], list[Any]]] = []

        def run(
            inputs: Sequence[Tensor],
            create_graph: bool,
            hypers: Callable[[Sequence[Tensor]], list[dict[str, Any]]] = hypers,
            first_order: bool = first_order,
            rebuild: Callable[[Sequence[Tensor]], list[Any]] = rebuild,
            structure: list[Callable[[Sequence[Tensor]], list[Any]]] = structure,
            n_state: int = len(state_tensors),
        ) -> tuple[Tensor, ...]:
            current = list(inputs[:n])
            loss = support_loss(current)
            new_params, new_states = diffopt.pure_step(
                loss,
                current,
                rebuild(inputs[n : n + n_state]),
                hypers(inputs[n + n_state :]),
                first_order=first_order or not create_graph,
            )
            new_tensors, new_rebuild = _flatten_state(new_states)
            if not structure:
                structure.append(new_rebuild)
            return (*new_params, *new_tensors, loss.detach())

        inputs = (*params, *state_tensors, *hyper_tensors)
        if step == steps - 1:
            # The backward pass starts with the last step: its graph is kept from the forward
            # pass rather than rebuilt, which saves one recomputation at one step's memory.
            outputs = run(inputs, create_graph=True)
        else:
            outputs = _RecomputedStep.apply(run, *inputs)
        if on_loss is not None:
            on_loss(outputs[-1], step)
        params = list(outputs[:n])
        states = structure[0](outputs[n:-1])
        fmodel.update_params(params)
        if after_step is not None:
            after_step(step + 1)
    diffopt.store_group_states(states)


def run_unroll(
    fmodel: FunctionalModule,
    diffopt: DifferentiableOptimizer,
    support_loss: Callable[[list[Tensor]], Tensor],
    steps: int,
    policy: UnrollPolicy | None = None,
    *,
    create_graph: bool = True,
    override: Callable[[int], Override | None] | None = None,
    on_loss: Callable[[Tensor, int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> None:
    """Run ``steps`` inner steps of ``diffopt`` on ``fmodel`` under an unroll policy.

    The loop behind :meth:`DifferentiableOptimizer.unroll` and
    :class:`~metalight.lightning.MetaLearningModule`: plain, first-order, truncated
    (first-order before the last ``policy.truncate`` steps, optimizer state carried across)
    or checkpointed (:func:`checkpointed_unroll`).

    Args:
        fmodel: the functional model; its fast weights are advanced.
        diffopt: its differentiable optimizer.
        support_loss: the inner loss as a function of the fast weights (a list in the
            order of ``fmodel.parameters()``); with ``policy.checkpoint`` it runs again in
            the backward pass, so it must have no side effects.
        steps: number of inner steps.
        policy: the unroll policy (default: plain, second order).
        create_graph: False runs every step first-order without a higher-order graph
            (evaluation).
        override: hyperparameters of each step (e.g. learnable learning rates), or None.
        on_loss: called with each step's detached inner loss (NaN checks).
        after_step: called with the number of steps done.

    Example:
        >>> import torch
        >>> import metalight
        >>> from metalight.unroll import UnrollPolicy, run_unroll
        >>> model = torch.nn.Linear(2, 1)
        >>> fmodel = metalight.monkeypatch(model, copy_initial_weights=False)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> diffopt = metalight.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
        >>> x, y = torch.randn(6, 2), torch.randn(6, 1)
        >>> loss = lambda params: (fmodel(x, params=params) - y).pow(2).mean()
        >>> run_unroll(fmodel, diffopt, loss, 4, UnrollPolicy(truncate=2))
        >>> loss(fmodel.fast_params).backward()
        >>> model.weight.grad.shape
        torch.Size([1, 2])
    """
    policy = policy if policy is not None else UnrollPolicy()
    if create_graph and policy.checkpoint:
        checkpointed_unroll(
            fmodel,
            diffopt,
            support_loss,
            steps,
            override=override,
            first_order_at=lambda step: policy.first_order_at(step, steps),
            on_loss=on_loss,
            after_step=after_step,
        )
        return
    for step in range(steps):
        diffopt.first_order = not create_graph or policy.first_order_at(step, steps)
        loss = support_loss(fmodel.fast_params or [])
        if on_loss is not None:
            on_loss(loss.detach(), step)
        diffopt._step(loss, override=None if override is None else override(step))
        if after_step is not None:
            after_step(step + 1)
