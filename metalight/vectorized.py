"""Task-vectorised adaptation: the inner loop of a whole meta-batch as one computation.

:meth:`MetaLearningModule.training_step <metalight.lightning.MetaLearningModule.training_step>`
adapts to the tasks of a meta-batch one after the other. :func:`vectorized_meta_loss` computes
the same meta-loss for all tasks at once: the adapted parameters carry a leading task dimension
(the meta-parameters expanded ``B`` times), the model runs once per inner step over the whole
meta-batch under :func:`torch.func.vmap` (convolutions become grouped convolutions, linear
layers batched matrix products), and the inner optimizer's pure functional core updates every
task's fast weights in one go. Its gradient with respect to the meta-parameters equals the
accumulated meta-gradient of the per-task loop (to rounding).

How the inner gradient is taken, and why BatchNorm is exact:
    ``vmap`` is used for the forward passes only. The per-task inner gradients come from one
    ordinary ``torch.autograd.grad`` of the *sum* of the task losses with respect to the
    task-batched fast weights (task ``b``'s loss depends on slice ``b`` only, so the gradient's
    slice ``b`` is task ``b``'s gradient), with ``create_graph=True`` for the second-order
    meta-gradient. Ordinary autograd records the operations vmap actually runs on the
    task-batched tensors, so every backward and double backward is that of a plain operation.
    The alternative, ``torch.func.grad`` inside ``vmap``, relies on vmap's batching rules for
    backward operations; with ``nn.BatchNorm2d`` in training mode that gave a silently wrong
    meta-gradient (wrong by several percent in float64, with a correct loss) on torch 2.13,
    see ``tests/test_vectorized.py``. BatchNorm in training mode normalises each task with that
    task's own batch statistics, as in the loop. Its running statistics are not updated: the
    loop updates them only in per-task copies that it throws away (they never reach the model
    nor influence a training-mode forward), so the meta-loss is the same.

The engine, :func:`vectorized_unroll`, takes its ingredients as arguments (the model, a
factory of the differentiable inner optimizer, the meta-batch, the inner and outer losses, the
step count and the unroll policy, ...) and knows nothing of Lightning. A
:class:`~metalight.lightning.MetaLearningModule` passes its own (its
``vectorized_adaptation``); :func:`check_vectorizable`, :func:`vectorized_task_losses` and
:func:`vectorized_meta_loss` are shorthands that ask a module to do so.

Supported: the default unroll of :class:`~metalight.lightning.MetaLearningModule` (MAML,
FOMAML, Meta-SGD, MAML++'s learnable per-step rates and multi-step loss, truncated unrolls;
ANIL and Reptile declare that the vectorised step reproduces theirs), any built-in inner
optimizer (SGD, Adam, ...: their pure updates are element-wise, so a task dimension passes
through), and any model whose forward ``vmap`` can batch. Refused with a ``ValueError``:
algorithms with their own adaptation or meta-gradient (iMAML), custom differentiable
optimizers without a pure core, gradient callbacks, ``checkpoint_unroll``, ``SyncBatchNorm``
in training mode, and layers vmap cannot batch (recurrent layers and cells, spectral norm);
``vectorize_tasks="auto"`` then trains with the loop.

Example:
    >>> import functools, torch
    >>> from metalight.data import TaskBatch
    >>> from metalight.lightning import MetaLearningModule
    >>> from metalight.models import MLP
    >>> from metalight.vectorized import vectorized_meta_loss
    >>> module = MetaLearningModule(
    ...     MLP(), inner_optim=functools.partial(torch.optim.SGD, lr=0.01), inner_steps=2)
    >>> x, y = torch.randn(4, 10, 1), torch.randn(4, 10, 1)
    >>> loss = vectorized_meta_loss(module, TaskBatch(x, y, x, y, torch.zeros(4, 2)))
    >>> loss.backward()  # the meta-gradient of the mean query loss, into .grad
    >>> module.model.head.weight.grad.shape
    torch.Size([1, 40])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn
from torch.func import vmap

from metalight.data.task import Task, TaskBatch
from metalight.functional import FunctionalModule, functional_call, monkeypatch
from metalight.optim.differentiable import DifferentiableOptimizer, FunctionalCoreOptimizer
from metalight.optim.unroll import Override, UnrollPolicy

__all__ = [
    "VectorizableModule",
    "VectorizedUnroll",
    "check_vectorizable",
    "check_vectorizable_model",
    "vectorized_meta_loss",
    "vectorized_task_losses",
    "vectorized_unroll",
]

LossFunction = Callable[[Tensor, Tensor, Task], Tensor]
"""``loss(output, target, task)``, as ``MetaLearningModule.inner_loss``/``outer_loss``."""


class VectorizableModule(Protocol):
    """What the shorthands need of a module (a ``MetaLearningModule`` has it)."""

    def check_vectorizable(self) -> None: ...

    def vectorized_task_losses(self, batch: TaskBatch) -> Tensor: ...


class VectorizedUnroll(NamedTuple):
    """What :func:`vectorized_unroll` returns for a meta-batch of ``B`` tasks."""

    losses: Tensor
    """``[B]``: each task's query loss (with ``multi_step_loss``, its mean over the steps)."""
    fast_params: list[Tensor]
    """The final fast weights in ``named_parameters()`` order: adapted ones with a leading
    task dimension, the others the parameters themselves."""
    accuracy: Tensor | None
    """``[B]``: each task's query accuracy after adaptation (detached); None for regression."""


def check_vectorizable_model(model: nn.Module, policy: UnrollPolicy) -> None:
    """Raise a ``ValueError`` naming what keeps ``model`` and ``policy`` from vectorising.

    Args:
        model: the network.
        policy: the unroll policy.

    Raises:
        ValueError: for a checkpointed unroll (``policy.checkpoint``), a ``SyncBatchNorm``
            in training mode, and layers vmap cannot batch (recurrent layers and cells,
            spectral norm).

    Example:
        >>> from metalight.models import MLP
        >>> from metalight.unroll import UnrollPolicy
        >>> check_vectorizable_model(MLP(), UnrollPolicy())
        >>> check_vectorizable_model(MLP(), UnrollPolicy(checkpoint=True))
        Traceback (most recent call last):
        ...
        ValueError: checkpoint_unroll=True cannot be task-vectorised ...
    """
    if policy.checkpoint:
        raise ValueError(
            "checkpoint_unroll=True cannot be task-vectorised (the vectorised unroll keeps "
            "every step's activations for all tasks at once); use the per-task loop"
        )
    for name, sub in model.named_modules():
        where = name or type(model).__name__
        if isinstance(sub, nn.SyncBatchNorm) and sub.training:
            raise ValueError(
                f"{where} is a SyncBatchNorm in training mode: "
                "its statistics are synchronised across processes per call, which cannot run "
                "under vmap; convert it to BatchNorm or use the per-task loop"
            )
        spectral = _has_spectral_norm(sub)
        if spectral or isinstance(sub, (nn.RNNBase, nn.RNNCellBase)):
            kind = "spectral_norm" if spectral else type(sub).__name__
            raise ValueError(
                f"{where} ({kind}) cannot be task-vectorised: vmap has no batching rule for it "
                "(or only torch's slow per-task fallback); use the per-task loop"
            )


def _has_spectral_norm(module: nn.Module) -> bool:
    # Both spectral norms run a power iteration whose in-place buffer updates vmap cannot
    # batch: the parametrization and the older forward pre-hook.
    parametrizations = getattr(module, "parametrizations", None)
    if isinstance(parametrizations, nn.ModuleDict):
        for chain in parametrizations.values():
            if any(type(p).__name__ == "_SpectralNorm" for p in chain):
                return True
    hooks = getattr(module, "_forward_pre_hooks", {})
    return any(type(h).__name__ == "SpectralNorm" for h in hooks.values())


def check_vectorizable(module: VectorizableModule) -> None:
    """Raise a ``ValueError`` naming what keeps ``module`` from task-vectorised adaptation.

    Shorthand for ``module.check_vectorizable()``: the module uses the default unroll (or
    declares that the vectorised step reproduces its own), and
    :func:`check_vectorizable_model` passes. The inner optimizer is checked when the loss is
    computed.

    Example:
        >>> from metalight.algorithms import ANIL, IMAML, MAML
        >>> from metalight.models import MLP
        >>> check_vectorizable(MAML(MLP()))
        >>> check_vectorizable(ANIL(MLP()))
        >>> check_vectorizable(IMAML(MLP()))
        Traceback (most recent call last):
        ...
        ValueError: IMAML overrides task_meta_gradient(): task-vectorised adaptation ...
    """
    module.check_vectorizable()


def _check_optimizer(diffopt: object) -> FunctionalCoreOptimizer:
    if not isinstance(diffopt, FunctionalCoreOptimizer):
        raise ValueError(
            f"task-vectorised adaptation needs a built-in differentiable optimizer with a pure "
            f"functional core; {type(diffopt).__name__} updates in place. Use the per-task loop"
        )
    if diffopt.grad_callback is not None:
        raise ValueError(
            f"{type(diffopt).__name__} has a grad_callback: it would see the gradients of all "
            "tasks at once (a task-batched tensor per parameter), which changes what e.g. "
            "norm clipping computes; use the per-task loop"
        )
    return diffopt


def _running_stat_overrides(model: nn.Module) -> dict[str, Tensor | None]:
    """``None`` for the running statistics of every norm layer in training mode.

    With them ``None``, a training-mode layer normalises with the batch statistics (what it
    does anyway) and updates nothing: under vmap, an in-place update of an unbatched buffer
    with per-task statistics is impossible.
    """
    overrides: dict[str, Tensor | None] = {}
    for name, sub in model.named_modules():
        if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.training:
            prefix = f"{name}." if name else ""
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(sub, buffer, None) is not None:
                    overrides[prefix + buffer] = None
    return overrides


def vectorized_unroll(
    model: nn.Module,
    make_optimizer: Callable[[FunctionalModule], DifferentiableOptimizer],
    batch: TaskBatch,
    inner_loss: LossFunction,
    outer_loss: LossFunction,
    steps: int,
    policy: UnrollPolicy,
    *,
    adapted: Sequence[str] | None = None,
    override: Callable[[int], Override | None] | None = None,
    multi_step_loss: bool = False,
    forward: Callable[[dict[str, Tensor], Tensor], Tensor] | None = None,
    classification: bool = False,
    check_finite: bool = True,
    nonfinite_error: Callable[[str], Exception] = FloatingPointError,
    graph: bool = True,
) -> VectorizedUnroll:
    """Adapt to every task of ``batch`` at once: query losses, accuracies, fast weights.

    Per task, this is the per-task loop's computation: ``steps`` steps of the inner
    optimizer on ``inner_loss`` over the support set, then ``outer_loss`` on the query set.

    Args:
        model: the network (its parameters are the meta-parameters).
        make_optimizer: builds the differentiable inner optimizer over a functional view of
            ``model`` (a built-in one with a pure functional core).
        batch: the meta-batch (at least one task).
        inner_loss: ``inner_loss(output, support_y, task)``, called under ``vmap`` with one
            task's tensors.
        outer_loss: ``outer_loss(output, query_y, task)``, likewise.
        steps: inner steps.
        policy: the unroll policy (``first_order``, ``truncate``; not ``checkpoint``).
        adapted: names of the adapted parameters (default: every trainable one).
        override: hyperparameters of inner step ``k`` (learnable inner rates), or None.
        multi_step_loss: average the query loss after every step (MAML++).
        forward: ``forward(values, x)``, the model's output with ``values`` (names of
            ``named_parameters()`` and buffers) replacing its tensors; default
            ``functional_call(model, values, (x,))``.
        classification: also return each task's query accuracy.
        check_finite: raise on a NaN or Inf inner or query loss, naming tasks and step.
        nonfinite_error: the exception type raised then.
        graph: ``True``: the losses are differentiable w.r.t. the meta-parameters (per the
            policy). ``False``: plain gradient steps with no graph kept (Reptile's
            adaptation); the losses and weights are detached.

    Returns:
        The :class:`VectorizedUnroll`.

    Raises:
        ValueError: an empty meta-batch, or what cannot be vectorised exactly.

    Example:
        >>> import functools, torch
        >>> import torch.nn.functional as F
        >>> from metalight.data import TaskBatch
        >>> from metalight.models import MLP
        >>> from metalight.optim import get_diff_optim
        >>> from metalight.unroll import UnrollPolicy
        >>> model = MLP(1, (8,), 3)
        >>> inner = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> def make(fmodel):
        ...     return get_diff_optim(inner, model.parameters(), fmodel=fmodel)
        >>> def loss(output, target, task):
        ...     return F.cross_entropy(output, target)
        >>> x, y = torch.randn(2, 6, 1), torch.arange(3).repeat(2).expand(2, 6)
        >>> unrolled = vectorized_unroll(model, make, TaskBatch(x, y, x, y, y), loss, loss, 2,
        ...                              UnrollPolicy(), classification=True)
        >>> unrolled.losses.shape, unrolled.accuracy.shape
        (torch.Size([2]), torch.Size([2]))
    """
    check_vectorizable_model(model, policy)
    if len(batch) == 0:
        raise ValueError(
            "the meta-batch holds no tasks: a meta-step needs at least one; check the data "
            "module's meta_batch_size (and, under DDP, that it is at least the number of "
            "processes)"
        )
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    tasks = len(batch)
    fmodel = monkeypatch(model, detach_initial_weights=False, track_higher_grads=True)
    diffopt = _check_optimizer(make_optimizer(fmodel))

    adapted_names = set(names if adapted is None else adapted)
    chosen = [i for i, (n, p) in enumerate(named) if n in adapted_names and p.requires_grad]
    # Fast weights in named_parameters() order: adapted ones get a leading task dimension
    # (a view of the meta-parameter, so the meta-gradient sums over tasks), the others stay
    # shared (unbatched under vmap).
    params: list[Tensor] = [p for _, p in named]
    for i in chosen:
        start = params[i] if graph else params[i].detach()
        params[i] = start.expand(tasks, *params[i].shape)
    fixed = _running_stat_overrides(model)
    if forward is None:

        def forward(values: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(model, values, (x,))

    def run(loss_of: Callable[[Tensor, Task], Tensor], query: bool) -> Callable[..., Tensor]:
        def per_task(
            batched: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, info: Tensor
        ) -> Tensor:
            task = Task(sx, sy, qx, qy, info)
            output = forward({**batched, **fixed}, qx if query else sx)
            return loss_of(output, task)

        return vmap(per_task, randomness="different")

    def query_loss_and_accuracy(
        batched: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, info: Tensor
    ) -> tuple[Tensor, Tensor]:
        task = Task(sx, sy, qx, qy, info)
        output = forward({**batched, **fixed}, qx)
        hits = (output.detach().argmax(-1) == qy).float().mean()
        return outer_loss(output, qy, task), hits

    support_losses = run(lambda out, t: inner_loss(out, t.support_y, t), query=False)
    query_losses = run(lambda out, t: outer_loss(out, t.query_y, t), query=True)
    final_query = vmap(query_loss_and_accuracy, randomness="different")
    fields = (batch.support_x, batch.support_y, batch.query_x, batch.query_y, batch.info)

    def batched(current: list[Tensor]) -> dict[str, Tensor]:
        return {names[i]: current[i] for i in chosen}

    def guard(losses: Tensor, where: str) -> None:
        if check_finite and not bool(torch.isfinite(losses.detach()).all()):
            bad = (~torch.isfinite(losses.detach())).nonzero().flatten().tolist()
            raise nonfinite_error(f"non-finite {where} in task(s) {bad} of the meta-batch")

    states = diffopt.group_states(params)
    step_losses: list[Tensor] = []
    for step in range(steps):
        hyper = None if override is None else override(step)
        if hyper is not None:
            diffopt.apply_override(hyper)
        if not graph:
            for i in chosen:
                params[i] = params[i].detach().requires_grad_()
        losses = support_losses(batched(params), *fields)
        guard(losses, f"inner loss at inner step {step}")
        first_order = not graph or policy.first_order_at(step, steps)
        found = torch.autograd.grad(
            losses.sum(),
            [params[i] for i in chosen],
            create_graph=not first_order,
            allow_unused=True,
        )
        grads: list[Tensor | None] = [None] * len(params)
        for i, g in zip(chosen, found, strict=True):
            grads[i] = g
        with torch.set_grad_enabled(graph and torch.is_grad_enabled()):
            params, states = diffopt.update_groups(grads, params, states, diffopt.hyperparameters())
        if multi_step_loss and step + 1 < steps:
            step_losses.append(query_losses(batched(params), *fields))
    hits: Tensor | None = None
    with torch.set_grad_enabled(graph and torch.is_grad_enabled()):
        if classification:
            final, hits = final_query(batched(params), *fields)
        else:
            final = query_losses(batched(params), *fields)
    guard(final, f"query loss after {steps} inner steps")
    if step_losses:
        final = torch.stack([*step_losses, final]).mean(0)
    if not graph:
        params = [p.detach() for p in params]
    return VectorizedUnroll(final, params, None if hits is None else hits.detach())


def vectorized_task_losses(module: VectorizableModule, batch: TaskBatch) -> Tensor:
    """Each task's query loss after the module's inner steps, all tasks at once.

    Shorthand for ``module.vectorized_task_losses(batch)``: :func:`vectorized_unroll` with the
    module's ingredients (its inner optimizer, ``inner_loss`` and ``outer_loss``, learnable
    inner rates, unroll policy and ``multi_step_loss``). The losses stay differentiable
    (second order unless the policy says otherwise) with respect to the meta-parameters.

    Returns:
        A tensor of shape ``[B]``: the query loss of each task (with ``multi_step_loss``, the
        mean over the inner steps' query losses).

    Raises:
        ValueError: for what cannot be vectorised exactly (see :func:`check_vectorizable`,
            and custom inner optimizers or gradient callbacks), and for algorithms whose
            meta-gradient is not the gradient of these losses (Reptile).
        NonFiniteError: a NaN or Inf in an inner or query loss, naming the tasks and the
            step (unless ``module.nan_policy == "off"``). With ``nan_policy="skip"`` it is
            raised too: dropping tasks needs the per-task loop.

    Example:
        >>> import functools, torch
        >>> from metalight.data import TaskBatch
        >>> from metalight.lightning import MetaLearningModule
        >>> from metalight.models import MLP
        >>> module = MetaLearningModule(
        ...     MLP(), inner_optim=functools.partial(torch.optim.SGD, lr=0.01), inner_steps=1)
        >>> x = torch.randn(3, 10, 1)
        >>> vectorized_task_losses(module, TaskBatch(x, x, x, x, torch.zeros(3, 2))).shape
        torch.Size([3])
    """
    return module.vectorized_task_losses(batch)


def vectorized_meta_loss(module: VectorizableModule, batch: TaskBatch) -> Tensor:
    """The meta-loss of ``batch``, the mean query loss over its tasks, computed task-vectorised.

    Its gradient with respect to ``module.meta_parameters()`` is the meta-gradient that
    :meth:`MetaLearningModule.training_step
    <metalight.lightning.MetaLearningModule.training_step>` accumulates task by task. All tasks'
    unroll graphs are alive at once until the backward pass (the loop frees each task's
    graph before the next), so memory grows with the meta-batch size.

    Args:
        module: the meta-learning module (its default unroll; see :func:`check_vectorizable`).
        batch: the meta-batch.

    Returns:
        A scalar tensor: the mean of :func:`vectorized_task_losses`.

    Raises:
        ValueError: for what cannot be vectorised exactly.
        NonFiniteError: a NaN or Inf in an inner or query loss (see
            :func:`vectorized_task_losses`).

    Example:
        >>> import functools, torch
        >>> from metalight.data import TaskBatch
        >>> from metalight.lightning import MetaLearningModule
        >>> from metalight.models import Conv4
        >>> module = MetaLearningModule(
        ...     Conv4(hidden=4, image_size=16),
        ...     inner_optim=functools.partial(torch.optim.SGD, lr=0.4), inner_steps=1)
        >>> x, y = torch.randn(2, 5, 1, 16, 16), torch.arange(5).expand(2, 5)
        >>> meta_loss = vectorized_meta_loss(module, TaskBatch(x, y, x, y, y))
        >>> grads = torch.autograd.grad(meta_loss, module.meta_parameters())
        >>> len(grads) == len(module.meta_parameters())
        True
    """
    return vectorized_task_losses(module, batch).mean()
