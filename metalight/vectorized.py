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

Supported: :class:`MetaLearningModule` with its default unroll (MAML, FOMAML, Meta-SGD, MAML++'s
learnable per-step rates and multi-step loss, truncated unrolls), any built-in inner optimizer
(SGD, Adam, ...: their pure updates are element-wise, so a task dimension passes through), and
any model whose forward ``vmap`` can batch. Refused with a ``ValueError``: subclasses that
override ``adapt``, ``adapt_task``, ``unroll`` or ``task_meta_gradient`` (iMAML; ANIL and
Reptile declare that the vectorised step reproduces theirs: ANIL's head-only adaptation is
the default unroll with ``adapt=[head]``, and Reptile's meta-gradient is taken from all
tasks' adapted weights at once), custom differentiable optimizers without a pure core,
gradient callbacks, ``checkpoint_unroll`` and ``SyncBatchNorm`` in training mode.

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

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import vmap

from metalight.data.task import Task, TaskBatch
from metalight.functional import functional_call, monkeypatch
from metalight.optim.differentiable import FunctionalCoreOptimizer

if TYPE_CHECKING:
    from metalight.lightning.module import MetaLearningModule

__all__ = [
    "VectorizedUnroll",
    "check_vectorizable",
    "vectorized_meta_loss",
    "vectorized_task_losses",
    "vectorized_unroll",
]

# The hooks whose default implementation this module re-implements in vectorised form.
_LOOP_HOOKS = ("adapt", "adapt_task", "unroll", "task_meta_gradient")


def check_vectorizable(module: MetaLearningModule) -> None:
    """Raise a ``ValueError`` naming what keeps ``module`` from task-vectorised adaptation.

    Checks what can be known without data: the module uses the default unroll, the unroll
    policy does not checkpoint, and no ``SyncBatchNorm`` is in training mode. The inner
    optimizer is checked when the loss is computed.

    Args:
        module: the meta-learning module.

    Raises:
        ValueError: if ``module`` overrides ``adapt``, ``adapt_task``, ``unroll`` or
            ``task_meta_gradient``,
            uses ``checkpoint_unroll=True``, or its model holds a ``SyncBatchNorm`` in
            training mode.

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
    from metalight.lightning.module import MetaLearningModule

    cls = type(module)
    # A class may declare hooks it overrides whose result the vectorised step reproduces
    # (ANIL's adapt runs the body once; the vectorised step runs it per step). The exemption
    # holds for that class's own implementation only, not for a subclass that overrides again.
    declarer = next((c for c in cls.__mro__ if "_vectorizes_as_default" in vars(c)), None)
    exempt = {
        hook: getattr(declarer, hook) for hook in getattr(declarer, "_vectorizes_as_default", ())
    }
    for hook in _LOOP_HOOKS:
        implementation = getattr(cls, hook)
        if implementation is exempt.get(hook):
            continue
        if implementation is not getattr(MetaLearningModule, hook):
            raise ValueError(
                f"{cls.__name__} overrides {hook}(): task-vectorised adaptation re-implements "
                "MetaLearningModule's default inner loop only, so it would not compute this "
                "algorithm's meta-gradient; use the per-task loop (training_step)"
            )
    if module.policy.checkpoint:
        raise ValueError(
            "checkpoint_unroll=True cannot be task-vectorised (the vectorised unroll keeps "
            "every step's activations for all tasks at once); use the per-task loop"
        )
    for name, sub in module.model.named_modules():
        if isinstance(sub, nn.SyncBatchNorm) and sub.training:
            raise ValueError(
                f"{name or type(module.model).__name__} is a SyncBatchNorm in training mode: "
                "its statistics are synchronised across processes per call, which cannot run "
                "under vmap; convert it to BatchNorm or use the per-task loop"
            )


def _check_optimizer(diffopt: object) -> FunctionalCoreOptimizer:
    if not isinstance(diffopt, FunctionalCoreOptimizer):
        raise ValueError(
            f"task-vectorised adaptation needs a built-in differentiable optimizer with a pure "
            f"functional core; {type(diffopt).__name__} updates in place. Use the per-task loop"
        )
    if diffopt._grad_callback is not None:
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


def vectorized_task_losses(module: MetaLearningModule, batch: TaskBatch) -> Tensor:
    """Each task's query loss after ``module.inner_steps`` vectorised inner steps.

    The computation follows :meth:`MetaLearningModule.task_meta_gradient
    <metalight.lightning.MetaLearningModule.task_meta_gradient>` for every task of ``batch``
    at once: the module's inner optimizer (through its pure functional core), its
    ``inner_loss`` and ``outer_loss`` (called under ``vmap`` with one task's tensors and that
    :class:`~metalight.data.Task`), its learnable inner rates (``inner_override``), its unroll
    policy (``first_order``, ``truncate``) and ``multi_step_loss``. The losses stay
    differentiable (second order unless the policy says otherwise) with respect to the
    meta-parameters.

    Args:
        module: the meta-learning module (its default unroll; see :func:`check_vectorizable`).
        batch: the meta-batch.

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
    if type(module)._vectorized_meta_gradient is not _default_meta_gradient():
        raise ValueError(
            f"{type(module).__name__}'s meta-gradient is not the gradient of its query losses "
            "(it defines its own vectorised meta-gradient): use its training_step"
        )
    return vectorized_unroll(module, batch, graph=True).losses


def _default_meta_gradient() -> Callable[..., object]:
    from metalight.lightning.module import MetaLearningModule

    return MetaLearningModule._vectorized_meta_gradient


class VectorizedUnroll(NamedTuple):
    """What :func:`vectorized_unroll` returns for a meta-batch of ``B`` tasks."""

    losses: Tensor
    """``[B]``: each task's query loss (with ``multi_step_loss``, its mean over the steps)."""
    fast_params: list[Tensor]
    """The final fast weights in ``named_parameters()`` order: adapted ones with a leading
    task dimension, the others the parameters themselves."""
    accuracy: Tensor | None
    """``[B]``: each task's query accuracy after adaptation (detached); None for regression."""


def vectorized_unroll(
    module: MetaLearningModule, batch: TaskBatch, *, graph: bool
) -> VectorizedUnroll:
    """Each task's query loss and accuracy and the final fast weights, all tasks at once.

    ``graph=True``: the losses are differentiable w.r.t. the meta-parameters (per the unroll
    policy). ``graph=False``: plain gradient steps with no graph kept (Reptile's adaptation);
    the losses and weights are detached.

    Args:
        module: the meta-learning module (its default unroll; see :func:`check_vectorizable`).
        batch: the meta-batch.
        graph: keep the graph for the meta-gradient.

    Returns:
        The :class:`VectorizedUnroll`.

    Example:
        >>> import functools, torch
        >>> from metalight.data import TaskBatch
        >>> from metalight.lightning import MetaLearningModule
        >>> from metalight.models import MLP
        >>> module = MetaLearningModule(MLP(1, (8,), 3), inner_steps=1)
        >>> x, y = torch.randn(2, 6, 1), torch.arange(3).repeat(2).expand(2, 6)
        >>> unrolled = vectorized_unroll(module, TaskBatch(x, y, x, y, y), graph=False)
        >>> unrolled.losses.shape, unrolled.accuracy.shape
        (torch.Size([2]), torch.Size([2]))
    """
    check_vectorizable(module)
    if len(batch) == 0:
        from metalight.lightning.module import _empty_batch_message

        raise ValueError(_empty_batch_message(None))
    model = module.model
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    tasks = len(batch)
    steps = module.inner_steps
    fmodel = monkeypatch(model, detach_initial_weights=False, track_higher_grads=True)
    diffopt = _check_optimizer(module.make_inner_optimizer(fmodel, True))

    adapted_names = set(module.adaptable_parameters())
    adapted = [i for i, (n, p) in enumerate(named) if n in adapted_names and p.requires_grad]
    # Fast weights in named_parameters() order: adapted ones get a leading task dimension
    # (a view of the meta-parameter, so the meta-gradient sums over tasks), the others stay
    # shared (unbatched under vmap).
    params: list[Tensor] = [p for _, p in named]
    for i in adapted:
        start = params[i] if graph else params[i].detach()
        params[i] = start.expand(tasks, *params[i].shape)
    fixed = _running_stat_overrides(model)
    forward = getattr(module, "_vectorized_forward", None)
    if forward is None:

        def forward(values: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(model, values, (x,))

    classification = module.is_classification(batch.query_y)

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
        return module.outer_loss(output, qy, task), hits

    support_losses = run(lambda out, t: module.inner_loss(out, t.support_y, t), query=False)
    query_losses = run(lambda out, t: module.outer_loss(out, t.query_y, t), query=True)
    final_query = vmap(query_loss_and_accuracy, randomness="different")
    fields = (batch.support_x, batch.support_y, batch.query_x, batch.query_y, batch.info)

    def batched(current: list[Tensor]) -> dict[str, Tensor]:
        return {names[i]: current[i] for i in adapted}

    check = module.nan_policy != "off"

    def guard(losses: Tensor, where: str) -> None:
        if check and not bool(torch.isfinite(losses.detach()).all()):
            bad = (~torch.isfinite(losses.detach())).nonzero().flatten().tolist()
            from metalight.lightning.module import NonFiniteError

            raise NonFiniteError(f"non-finite {where} in task(s) {bad} of the meta-batch")

    states = diffopt.group_states(params)
    step_losses: list[Tensor] = []
    for step in range(steps):
        override = module.inner_override(step)
        if override is not None:
            diffopt._apply_override(override)
        if not graph:
            for i in adapted:
                params[i] = params[i].detach().requires_grad_()
        losses = support_losses(batched(params), *fields)
        guard(losses, f"inner loss at inner step {step}")
        first_order = not graph or module.policy.first_order_at(step, steps)
        found = torch.autograd.grad(
            losses.sum(),
            [params[i] for i in adapted],
            create_graph=not first_order,
            allow_unused=True,
        )
        grads: list[Tensor | None] = [None] * len(params)
        for i, g in zip(adapted, found, strict=True):
            grads[i] = g
        with torch.set_grad_enabled(graph and torch.is_grad_enabled()):
            params, states = diffopt.update_groups(grads, params, states, diffopt.hyperparameters())
        if module.multi_step_loss and step + 1 < steps:
            step_losses.append(query_losses(batched(params), *fields))
    with torch.set_grad_enabled(graph and torch.is_grad_enabled()):
        if classification:
            final, hits = final_query(batched(params), *fields)
        else:
            final, hits = query_losses(batched(params), *fields), None
    guard(final, f"query loss after {steps} inner steps")
    if step_losses:
        final = torch.stack([*step_losses, final]).mean(0)
    if not graph:
        params = [p.detach() for p in params]
    return VectorizedUnroll(final, params, None if hits is None else hits.detach())


def vectorized_meta_loss(module: MetaLearningModule, batch: TaskBatch) -> Tensor:
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
