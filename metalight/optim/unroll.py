"""The unroll loop and its policies, written once over what it needs from an optimizer.

This module sits below the stateful optimizers (:mod:`metalight.optim.differentiable`
imports it, never the reverse): the loop knows an optimizer only through the small
:class:`InnerOptimizer` protocol and a functional model only through :class:`FastWeights`.

:func:`run_unroll` picks one of two loops, one step each:

- ``_pure_step_loop``, for built-in optimizers (``supports_pure_step``): it carries
  ``(params, states)`` through the optimizer's one pure step
  (:meth:`InnerOptimizer.pure_step`), reading the state once before the first step and
  storing it once after the last. A checkpointed unroll (:func:`checkpointed_unroll`)
  wraps the same pure step in a node that recomputes it in the backward pass
  (:func:`recomputed_step`), on the view's buffers and modes as that step saw them.
- ``_stateful_step_loop``, for custom optimizers written for higher (a stateful
  ``_update``): one :meth:`InnerOptimizer.inner_step` per step.

:func:`recomputed_step` is the checkpointed step on its own, for any step function of
explicit weights, optimizer states and extra differentiable inputs: the bilevel engine
(:mod:`metalight.bilevel.unroll`) uses it with its meta-parameters as those inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "FastWeights",
    "GradCallback",
    "InnerOptimizer",
    "Override",
    "Replayable",
    "StepFn",
    "UnrollPolicy",
    "checkpointed_unroll",
    "recomputed_step",
    "run_unroll",
]

GradCallback = Callable[[list[Tensor | None]], Sequence[Tensor | None]]
"""Maps the list of gradients (None where a fast weight got none) to new ones."""

Override = Mapping[str, Any]
"""Hyperparameters replacing a group's: ``{"lr": [one_value]}`` or one value per group."""

StepOverride = Callable[[int], Override | None]
"""Hyperparameters of inner step ``step`` (0-based), or None to keep the current ones."""


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
        """Refuse a truncation that is not a count of steps."""
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


class FastWeights(Protocol):
    """What the loop needs from a functional model: its latest fast weights."""

    @property
    def fast_params(self) -> list[Tensor] | None:
        """The latest fast weights (None before any)."""
        ...

    def update_params(self, params: Iterable[Tensor]) -> None:
        """Make ``params`` the latest fast weights."""
        ...


@runtime_checkable
class Replayable(Protocol):
    """A functional model whose calls a checkpointed unroll can replay as they ran.

    A recomputed step must see the buffers (BatchNorm running statistics, spectral norm's
    power-iteration vectors) and train/eval modes its forward pass saw, and must not move
    the buffers again. :class:`~metalight.functional.FunctionalModule` provides this (the
    bilevel engine has its own for a plain ``nn.Module``); a model without it is
    recomputed as it is at the time (right for a model whose forward pass changes no
    buffer, and whose modes do not change before the backward pass).
    """

    def view_state(self) -> Any:
        """Copies of the buffers and the modes, as they are now."""
        ...

    def replaying(self, state: Any) -> contextlib.AbstractContextManager[Any]:
        """Calls inside run on copies of ``state``; afterwards the view's own are back."""
        ...


@dataclasses.dataclass
class _StepReplay:
    """What a recomputed step must see again: the view's state and the random generators'.

    Dropout draws its masks from the global generators: the recomputation draws the ones
    the forward pass drew (as ``torch.utils.checkpoint`` does), and leaves the generators
    where the caller's program has them.
    """

    view: Replayable | None
    view_state: Any
    cpu_rng: Tensor
    cuda_rngs: list[tuple[int, Tensor]]

    @classmethod
    def capture(cls, view: Replayable | None, tensors: Sequence[Tensor]) -> _StepReplay:
        """The state of ``view`` and of the generators of ``tensors``' devices, now."""
        cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
        return cls(
            view,
            None if view is None else view.view_state(),
            torch.get_rng_state(),
            [(d, torch.cuda.get_rng_state(d)) for d in cuda],
        )

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Run inside as the step's forward pass ran; afterwards all is as it was."""
        with contextlib.ExitStack() as stack:
            if self.view is not None:
                stack.enter_context(self.view.replaying(self.view_state))
            stack.enter_context(torch.random.fork_rng(devices=[d for d, _ in self.cuda_rngs]))
            torch.set_rng_state(self.cpu_rng)
            for device, state in self.cuda_rngs:
                torch.cuda.set_rng_state(state, device)
            yield


class InnerOptimizer(Protocol):
    """What the loop needs from a differentiable optimizer.

    :class:`~metalight.optim.DifferentiableOptimizer` provides all of it; the pure-step
    methods work only where ``supports_pure_step`` is true (built-in optimizers).
    """

    @property
    def track_higher_grads(self) -> bool:
        """Whether steps keep the graph needed for higher-order gradients."""
        ...

    @property
    def supports_pure_step(self) -> bool:
        """Whether the update is a pure function of ``(params, states, hypers)``."""
        ...

    def apply_override(self, override: Override) -> None:
        """Replace hyperparameters of the groups (this step and after)."""
        ...

    def inner_step(
        self,
        loss: Tensor,
        params: Iterable[Tensor] | None = None,
        override: Override | None = None,
        grad_callback: GradCallback | None = None,
        *,
        first_order: bool | None = None,
        **kwargs: Any,
    ) -> list[Tensor]:
        """One stateful step on ``loss``; returns (and records) the new fast weights."""
        ...

    def hyperparameters(self) -> list[dict[str, Any]]:
        """The hyperparameters of each group, as they are now."""
        ...

    def group_states(self, params: Sequence[Tensor]) -> list[Any]:
        """Each group's optimizer state (fresh entries initialised for ``params``)."""
        ...

    def store_group_states(
        self, states: Sequence[Any], params: Sequence[Tensor] | None = None
    ) -> None:
        """Keep ``states`` (and the fast weights ``params``) as the optimizer's own."""
        ...

    def pure_step(
        self,
        loss: Tensor,
        params: Sequence[Tensor],
        states: Sequence[Any],
        hypers: Sequence[dict[str, Any]],
        first_order: bool = False,
    ) -> tuple[list[Tensor], list[Any]]:
        """One step on explicit parameters and states, touching nothing else."""
        ...


class _Slot(int):
    """Marks where a tensor of a flattened structure goes back."""


def _flatten_hypers(
    hypers: Sequence[dict[str, Any]],
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
                slots: list[Any] = []
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


def _flatten_state(
    states: Sequence[Any],
) -> tuple[list[Tensor], Callable[[Sequence[Tensor]], list[Any]]]:
    """Tensors of NamedTuple group states, and a function that puts tensors back."""
    tensors: list[Tensor] = []
    layout: list[tuple[type, list[list[Any]]]] = []
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


def _release_if_spent(ctx: Any) -> None:
    """After a backward pass: drop a recomputed step's closure if its inputs are freed."""
    try:
        _ = ctx.saved_tensors  # raises once a backward pass without retain_graph freed them
    except RuntimeError:
        ctx.run = ctx.replay = None


class _RecomputedStep(torch.autograd.Function):
    """One inner step that keeps only its inputs and recomputes its graph in backward."""

    @staticmethod
    def forward(
        ctx: Any,
        run: Callable[..., tuple[Tensor, ...]],
        n_params: int,
        replay: _StepReplay,
        *inputs: Tensor,
    ) -> Any:
        ctx.run = run
        ctx.replay = replay
        ctx.save_for_backward(*inputs)
        with torch.enable_grad():
            # The forward pass needs first-order gradients only, and no graph survives it.
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
            outputs = run(leaves, create_graph=False)
        # An autograd.Function's outputs all require grad when any input does. A fast
        # weight that depends on nothing differentiable (a frozen parameter gets no
        # gradient, so no update) must not, or the next step would take a gradient for it
        # and update it. Whether a fast weight depends on anything is the same here as in
        # the recomputation: this pass drops only the gradients' own graphs. States stay
        # differentiable: a momentum buffer depends on the weights through the gradient's
        # graph alone, which this pass does not build.
        constant = [not o.requires_grad for o in outputs[:n_params]]
        outputs = tuple(o.detach() for o in outputs)
        ctx.mark_non_differentiable(
            outputs[-1], *[o for o, c in zip(outputs[:n_params], constant, strict=True) if c]
        )
        return outputs

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> Any:
        inputs = ctx.saved_tensors
        run, replay = ctx.run, ctx.replay
        # The step's closure reaches the functional view, whose history holds this node's
        # outputs: a reference cycle through autograd's graph, which the garbage collector
        # cannot see. Once a backward pass has freed this node's saved tensors (no
        # retain_graph), nothing can run it again, and dropping the closure then frees the
        # view and its fast weights with the meta-loss.
        torch.autograd.Variable._execution_engine.queue_callback(
            functools.partial(_release_if_spent, ctx)
        )
        # The recomputation runs on copies of the buffers this step's forward pass found
        # (its in-place updates, e.g. spectral norm's power iteration, then give what they
        # gave), in the modes and with the random numbers it ran with; the view and the
        # generators keep what the forward passes left.
        with replay.replaying(), torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
            outputs = run(leaves, create_graph=True)[:-1]
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
        return (None, None, None, *[next(found) if t.requires_grad else None for t in leaves])


StepFn = Callable[
    [list[Tensor], list[Any], list[Tensor], bool], tuple[Sequence[Tensor], Sequence[Any], Tensor]
]
"""``(params, states, extra, create_graph) -> (new_params, new_states, loss)``: one inner step
(see :func:`recomputed_step`)."""


def recomputed_step(
    step: StepFn,
    params: Sequence[Tensor],
    states: Sequence[Any],
    extra: Sequence[Tensor] = (),
    *,
    view: Replayable | None = None,
) -> tuple[list[Tensor], list[Any], Tensor]:
    """One inner step as one autograd node that keeps only its inputs and recomputes its
    graph in the backward pass.

    ``step`` runs twice: in the forward pass with ``create_graph=False`` (first-order: no
    graph survives it) and in the backward pass with ``create_graph=True``, on fresh leaves
    of ``params``, the tensors of ``states`` and ``extra``, from which the gradients flow to
    the originals. So ``step`` must read every tensor it should differentiate from its
    arguments, and have no side effects but on ``view``. The recomputation runs on copies of
    ``view``'s buffers and in its modes as the forward pass found them
    (:class:`Replayable`), and with the random numbers the forward pass drew (dropout); the
    view and the random generators keep what the forward passes left. A new weight that
    depends on nothing differentiable (a frozen parameter, which gets no update) does not
    require grad. Higher-order derivatives through the node are not available.

    Args:
        step: ``(params, states, extra, create_graph) -> (new_params, new_states, loss)``.
        params: the weights (each step's first ``len(params)`` outputs match them).
        states: optimizer states: NamedTuples whose fields are lists (tensors or not), as
            the functional optimizers of :mod:`metalight.optim.functional` keep them.
        extra: further differentiable inputs of ``step`` (tensor hyperparameters,
            meta-parameters).
        view: the model whose buffers and modes a recomputation must see as they were.

    Returns:
        ``(new_params, new_states, loss)``, the loss detached.

    Example:
        >>> import torch
        >>> from metalight.optim.functional import sgd
        >>> from metalight.optim.unroll import recomputed_step
        >>> w = [torch.ones(2, requires_grad=True)]
        >>> lr = torch.tensor(0.1, requires_grad=True)
        >>> def step(params, states, extra, create_graph):
        ...     loss = (params[0] ** 2).sum()
        ...     (grad,) = torch.autograd.grad(loss, params, create_graph=create_graph)
        ...     new, state = sgd.update([grad], states[0], params, lr=extra[0])
        ...     return new, [state], loss
        >>> new, _, loss = recomputed_step(step, w, [sgd.init(w)], [lr])
        >>> new[0].sum().backward()  # d/dlr of sum(w - lr * 2w) = -4
        >>> lr.grad
        tensor(-4.)
    """
    n = len(params)
    state_tensors, rebuild_state = _flatten_state(states)
    n_state = len(state_tensors)
    structure: list[Callable[[Sequence[Tensor]], list[Any]]] = []

    def run(inputs: Sequence[Tensor], create_graph: bool) -> tuple[Tensor, ...]:
        new_params, new_states, loss = step(
            list(inputs[:n]),
            rebuild_state(inputs[n : n + n_state]),
            list(inputs[n + n_state :]),
            create_graph,
        )
        new_tensors, new_rebuild = _flatten_state(new_states)
        if not structure:
            structure.append(new_rebuild)
        return (*new_params, *new_tensors, loss.detach())

    # One copy of the buffers, modes and generator states per step, for the recomputation.
    replay = _StepReplay.capture(view, params)
    # autograd.Function.apply is untyped in torch's stubs.
    outputs = _RecomputedStep.apply(  # type: ignore[no-untyped-call]
        run, n, replay, *params, *state_tensors, *extra
    )
    return list(outputs[:n]), structure[0](outputs[n:-1]), outputs[-1]


def _recomputed_step(
    fmodel: FastWeights,
    diffopt: InnerOptimizer,
    support_loss: Callable[[list[Tensor]], Tensor],
    params: list[Tensor],
    states: list[Any],
    hypers: list[dict[str, Any]],
    first_order: bool,
) -> tuple[list[Tensor], list[Any], Tensor]:
    """The optimizer's pure step as one recomputed node; tensor hyperparameters its extra."""
    hyper_tensors, rebuild_hypers = _flatten_hypers(hypers)

    def step(
        current: list[Tensor], own_states: list[Any], own_hypers: list[Tensor], create_graph: bool
    ) -> tuple[list[Tensor], list[Any], Tensor]:
        loss = support_loss(current)
        new_params, new_states = diffopt.pure_step(
            loss,
            current,
            own_states,
            rebuild_hypers(own_hypers),
            first_order=first_order or not create_graph,
        )
        return new_params, new_states, loss

    view = fmodel if isinstance(fmodel, Replayable) else None
    return recomputed_step(step, params, states, hyper_tensors, view=view)


def _pure_step_loop(
    fmodel: FastWeights,
    diffopt: InnerOptimizer,
    support_loss: Callable[[list[Tensor]], Tensor],
    steps: int,
    *,
    checkpoint: bool,
    first_order_at: Callable[[int], bool],
    override: StepOverride | None,
    on_loss: Callable[[Tensor, int], None] | None,
    after_step: Callable[[int], None] | None,
) -> None:
    """The loop of built-in optimizers: ``(params, states)`` through the one pure step."""
    params = list(fmodel.fast_params or [])
    states = diffopt.group_states(params)
    track = diffopt.track_higher_grads
    for step in range(steps):
        if override is not None and (values := override(step)) is not None:
            diffopt.apply_override(values)
        hypers = diffopt.hyperparameters()
        first_order = first_order_at(step)
        # The backward pass starts with the last step: its graph is kept from the forward
        # pass rather than rebuilt, which saves one recomputation at one step's memory.
        if checkpoint and step < steps - 1:
            params, states, detached = _recomputed_step(
                fmodel, diffopt, support_loss, params, states, hypers, first_order
            )
            if on_loss is not None:
                on_loss(detached, step)
        else:
            loss = support_loss(params)
            if on_loss is not None:
                on_loss(loss.detach(), step)
            # In test mode no graph is wanted, so the update itself records none either
            # (pure_step then returns detached weights).
            with torch.set_grad_enabled(track and torch.is_grad_enabled()):
                params, states = diffopt.pure_step(loss, params, states, hypers, first_order)
        fmodel.update_params(params)
        if after_step is not None:
            after_step(step + 1)
    diffopt.store_group_states(states, params)


def _stateful_step_loop(
    fmodel: FastWeights,
    diffopt: InnerOptimizer,
    support_loss: Callable[[list[Tensor]], Tensor],
    steps: int,
    *,
    first_order_at: Callable[[int], bool],
    override: StepOverride | None,
    on_loss: Callable[[Tensor, int], None] | None,
    after_step: Callable[[int], None] | None,
) -> None:
    """The loop of custom optimizers (higher's in-place ``_update``): one stateful step each.

    No checkpointing: a recomputed step would run ``_update`` twice (see _refuse_stateful).
    """
    for step in range(steps):
        loss = support_loss(fmodel.fast_params or [])
        if on_loss is not None:
            on_loss(loss.detach(), step)
        diffopt.inner_step(
            loss,
            override=None if override is None else override(step),
            first_order=first_order_at(step),
        )
        if after_step is not None:
            after_step(step + 1)


def _refuse_stateful(diffopt: InnerOptimizer) -> None:
    if not diffopt.supports_pure_step:
        raise TypeError(
            f"the checkpointed unroll needs a built-in differentiable optimizer with a pure "
            f"functional core; {type(diffopt).__name__} updates in place (its _update would run "
            "twice when recomputed). Use the plain unroll for custom optimizers."
        )


def checkpointed_unroll(
    fmodel: FastWeights,
    diffopt: InnerOptimizer,
    support_loss: Callable[[list[Tensor]], Tensor],
    steps: int,
    *,
    override: StepOverride | None = None,
    first_order_at: Callable[[int], bool] | None = None,
    on_loss: Callable[[Tensor, int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> None:
    """Unroll ``steps`` differentiable steps, recomputing each step's graph in backward.

    Each step but the last (inner forward, gradient, optimizer update) is one autograd node
    that keeps only its inputs (fast weights, optimizer state, tensor hyperparameters): the
    forward pass builds no second-order graph for it, and the backward pass rebuilds one
    step's graph at a time. The last step keeps its graph, as the backward pass needs it
    first. Peak memory is about two steps' graphs plus ``steps`` copies of the fast weights,
    optimizer state and buffers; time about one extra forward-and-gradient pass per step.
    The meta-gradient equals the plain unroll's. Higher-order derivatives of the meta-loss
    (a gradient of the meta-gradient) are not available through it. A step is recomputed
    on copies of the buffers its forward pass saw (kept per step: BatchNorm running
    statistics, spectral norm's power-iteration vectors) and in the train/eval modes it ran
    in, with the random numbers it drew (dropout masks), so buffers that a forward pass
    updates in place, a view put in eval mode for the meta-loss, or dropout give the plain
    unroll's meta-gradient; the backward pass leaves the view's buffers as the forward
    passes left them and the random generators where the program has them. A parameter
    that does not require grad (frozen) is not updated, as by ``torch.optim``.

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

    Example:
        >>> import torch
        >>> import metalight
        >>> from metalight.optim.unroll import checkpointed_unroll
        >>> model = torch.nn.Linear(2, 1)
        >>> fmodel = metalight.monkeypatch(model, copy_initial_weights=False)
        >>> opt = torch.optim.Adam(model.parameters(), lr=0.1)
        >>> diffopt = metalight.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
        >>> x, y = torch.randn(6, 2), torch.randn(6, 1)
        >>> loss = lambda params: (fmodel(x, params=params) - y).pow(2).mean()
        >>> checkpointed_unroll(fmodel, diffopt, loss, 10)
        >>> loss(fmodel.fast_params).backward()
        >>> model.weight.grad.shape
        torch.Size([1, 2])
    """
    _refuse_stateful(diffopt)
    _pure_step_loop(
        fmodel,
        diffopt,
        support_loss,
        steps,
        checkpoint=True,
        first_order_at=first_order_at if first_order_at is not None else lambda _step: False,
        override=override,
        on_loss=on_loss,
        after_step=after_step,
    )


def run_unroll(
    fmodel: FastWeights,
    diffopt: InnerOptimizer,
    support_loss: Callable[[list[Tensor]], Tensor],
    steps: int,
    policy: UnrollPolicy | None = None,
    *,
    create_graph: bool = True,
    override: StepOverride | None = None,
    on_loss: Callable[[Tensor, int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> None:
    """Run ``steps`` inner steps of ``diffopt`` on ``fmodel`` under an unroll policy.

    The loop behind :meth:`DifferentiableOptimizer.unroll
    <metalight.optim.DifferentiableOptimizer.unroll>` and
    :class:`~metalight.lightning.MetaLearningModule`: plain, first-order, truncated
    (first-order before the last ``policy.truncate`` steps, optimizer state carried across)
    or checkpointed (:func:`checkpointed_unroll`). Whether a step is first-order is decided
    here and passed to the step; the optimizer's own ``first_order`` setting is not read.

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

    Raises:
        TypeError: ``policy.checkpoint`` with an optimizer without a pure functional core.

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
    checkpoint = create_graph and policy.checkpoint
    if checkpoint:
        _refuse_stateful(diffopt)

    def first_order_at(step: int) -> bool:
        return not create_graph or policy.first_order_at(step, steps)

    if diffopt.supports_pure_step:
        _pure_step_loop(
            fmodel,
            diffopt,
            support_loss,
            steps,
            checkpoint=checkpoint,
            first_order_at=first_order_at,
            override=override,
            on_loss=on_loss,
            after_step=after_step,
        )
    else:
        _stateful_step_loop(
            fmodel,
            diffopt,
            support_loss,
            steps,
            first_order_at=first_order_at,
            override=override,
            on_loss=on_loss,
            after_step=after_step,
        )
