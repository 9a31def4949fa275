"""``MetaLearningModule``: the Lightning base class whose training step is an inner unroll.

One meta-iteration: for every task of the meta-batch, adapt the model on the support set with
a differentiable optimizer, compute the query loss with the adapted fast weights, take that
task's contribution to the meta-gradient at once (so its unroll graph is freed before the
next task runs), and return one scalar to Lightning. The scalar is built so that its
gradient is the accumulated meta-gradient: Lightning then runs one backward, one DDP
all-reduce, gradient clipping, accumulation, precision scaling and the outer step as usual.

This module holds the class and the hooks a subclass overrides; each other job lives beside
it: :mod:`~metalight.lightning.adaptation` (what ``adapt`` returns),
:mod:`~metalight.lightning.support` (``adapt``'s argument checks),
:mod:`~metalight.lightning.inner_lr` (adapted parameters, learned inner rates),
:mod:`~metalight.lightning.finite` (the NaN policy's checks),
:mod:`~metalight.lightning.distributed` (what the ranks agree on),
:mod:`~metalight.lightning.evaluation` and :mod:`~metalight.lightning.metrics` (validation
and test), :mod:`~metalight.lightning.factories` (optimizers saved in checkpoints).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalight.data.task import Task, TaskBatch
from metalight.functional import FunctionalModule, functional_call, monkeypatch
from metalight.lightning.adaptation import Adaptation
from metalight.lightning.distributed import (
    global_counts,
    is_distributed,
    merge_used,
    meta_gradient_surrogate,
    on_any_rank,
    raise_on_any_rank,
    used_on_any_rank,
)
from metalight.lightning.evaluation import evaluate_batch, log_episode_metrics
from metalight.lightning.factories import UNSAVED, build_factory, describe_factory
from metalight.lightning.finite import FiniteChecks, NonFiniteError
from metalight.lightning.finite import all_finite as _all_finite
from metalight.lightning.inner_lr import (
    InnerLR,
    base_lr,
    make_inner_lrs,
    resolve_adapted,
    select_adapted,
)
from metalight.lightning.inner_lr import (
    inner_override as learned_rates_override,
)
from metalight.lightning.metrics import EpisodeMetrics
from metalight.lightning.strategies import check_strategy
from metalight.lightning.support import adapt_arguments, model_tensor
from metalight.optim.differentiable import DifferentiableOptimizer
from metalight.optim.registry import differentiable_class, get_diff_optim
from metalight.unroll import UnrollPolicy, run_unroll
from metalight.vectorized import VectorizedUnroll, check_vectorizable_model, vectorized_unroll

__all__ = ["Adaptation", "InnerLR", "MetaLearningModule", "NonFiniteError"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
StepCallback = Callable[[int, Callable[[Tensor], Tensor]], None]


# Partials rather than functions: a checkpoint describes them as class and hyperparameters.
_default_inner_optim = functools.partial(torch.optim.SGD, lr=0.01)
_default_outer_optim = functools.partial(torch.optim.Adam, lr=1e-3)


def _zero_loss(params: Sequence[Tensor]) -> Tensor:
    """A zero meta-loss on the parameters' device (a rank whose tasks were all skipped)."""
    return torch.zeros((), device=params[0].device) if params else torch.zeros(())


def _empty_batch_message(batch_idx: int | None) -> str:
    where = "the meta-batch" if batch_idx is None else f"meta-batch {batch_idx}"
    return (
        f"{where} holds no tasks: a meta-step needs at least one; check the data module's "
        "meta_batch_size (and, under DDP, that it is at least the number of processes)"
    )


def _factory_or_deferred_error(value: Any, argument: str) -> Callable[..., Any]:
    """The factory of ``value``; for an unsaved one, a factory that explains when called."""
    if isinstance(value, Mapping) and UNSAVED in value:

        def explain(*args: Any, **kwargs: Any) -> Any:
            build_factory(value, argument)  # raises the explanation

        return explain
    return build_factory(value, argument)


class MetaLearningModule(L.LightningModule):
    """Gradient-based meta-learning (MAML by default) as a ``LightningModule``.

    Subclass it to write an algorithm: the small hooks are :meth:`inner_loss`,
    :meth:`outer_loss`, :meth:`adaptable_parameters`, :meth:`adapt` and
    :meth:`task_meta_gradient`. Validation and test adapt too (``eval_inner_steps``, no
    higher-order graph) and log pre- and post-adaptation loss and accuracy with a 95%
    confidence interval over episodes. Use a ``Trainer(inference_mode=False)``: adapting
    needs gradients in validation and test.

    Args:
        model: the network; every trainable parameter is meta-learned.
        inner_optim: builds the inner ``torch.optim`` optimizer from parameters (a class
            with ``functools.partial`` hyperparameters, e.g. ``partial(torch.optim.SGD,
            lr=0.4)``, or its description ``{"_target_": "torch.optim.SGD", "_partial_":
            True, "lr": 0.4}``); any optimizer with a differentiable version works.
        inner_steps: inner steps per task in training (0 trains without adaptation).
        eval_inner_steps: inner steps in validation and test (default: ``inner_steps``).
        eval_report_steps: extra step counts at which evaluation also logs the query loss
            and accuracy (e.g. ``[1]`` with 10 eval steps, as in the MAML paper).
        outer_optim: builds the outer optimizer from the meta-parameters (default Adam 1e-3).
        scheduler: builds an LR scheduler from the outer optimizer (stepped per step).
        first_order: the first-order approximation (FOMAML) instead of second order.
        truncate: meta-gradient only through the last ``truncate`` inner steps (earlier
            steps first-order); None for all steps.
        checkpoint_unroll: recompute each inner step's activations during the backward
            pass instead of storing them (memory grows with the inner steps only by the fast
            weights; the meta-gradient is unchanged). Needs a built-in inner optimizer.
        adapted: names (or name prefixes) of the parameters adapted in the inner loop;
            None adapts all trainable parameters. Saved in the hyperparameters under this
            name.
        learn_inner_lr: learnable inner learning rates: "scalar" (one), "per_layer" (one
            per adapted parameter tensor), "per_layer_per_step" (MAML++), "per_parameter"
            (Meta-SGD: one per weight entry). None keeps the optimizer's fixed lr.
        multi_step_loss: MAML++'s per-step losses: the meta-loss averages the query loss
            after every inner step instead of only the last.
        task_type: "classification" (cross-entropy, accuracy), "regression" (MSE) or
            "auto" (from the target dtype).
        nan_policy: what a NaN or Inf in an inner step does: "raise" (an error naming the
            task, step and parameter), "skip" (drop that task from the meta-batch with a
            warning; under DDP the ranks agree on what was kept, at the cost of one small
            all-reduce per step) or "off" (no check).
        vectorize_tasks: adapt all tasks of a meta-batch in one vectorised computation
            (:mod:`metalight.vectorized`; same meta-gradient). "auto" uses it where it was
            measured faster: models without convolutions (an MLP meta-step ran 2-11x faster
            on 2 CPU cores; Conv-4 ran 1.6-2.6x slower, and the loop keeps memory flat in the
            meta-batch), and only for the algorithms it supports.
        adapt: the former name of ``adapted`` (not to be confused with the method
            :meth:`adapt`), still accepted for existing code, configs and checkpoints.

    Example:
        >>> import functools, torch
        >>> from metalight.lightning import MetaLearningModule
        >>> from metalight.models import MLP
        >>> module = MetaLearningModule(
        ...     MLP(), inner_optim=functools.partial(torch.optim.SGD, lr=0.01), inner_steps=1)

    Checkpoints hold every constructor argument but the model: the optimizer factories as
    descriptions (class path and hyperparameters, see :mod:`metalight.lightning.factories`),
    so ``MAML.load_from_checkpoint(path, model=MLP())`` adapts exactly as the trained module.
    """

    # Hooks of the per-task loop that the task-vectorised step re-implements. A subclass that
    # overrides one trains with the loop, unless it declares in ``vectorized_hooks`` (a
    # public extension point) that the vectorised step reproduces its implementation (ANIL,
    # Reptile); the declaration covers that class's own implementation, not a subclass that
    # overrides again.
    _LOOP_HOOKS: ClassVar[tuple[str, ...]] = ("adapt", "adapt_task", "unroll", "task_meta_gradient")
    vectorized_hooks: ClassVar[tuple[str, ...]] = ()
    _overridden_loop_hooks: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Once per class, not per meta-step.
        declarer = next(c for c in cls.__mro__ if "vectorized_hooks" in vars(c))
        exempt = {hook: getattr(declarer, hook) for hook in declarer.vectorized_hooks}
        cls._overridden_loop_hooks = tuple(
            hook
            for hook in cls._LOOP_HOOKS
            if getattr(cls, hook) is not getattr(MetaLearningModule, hook)
            and getattr(cls, hook) is not exempt.get(hook)
        )

    # Factory arguments saved with the hyperparameters (a subclass that builds one itself,
    # like MetaSGD's inner SGD, leaves it out so that reloading does not pass it twice).
    _saved_factories: tuple[str, ...] = ("inner_optim", "outer_optim", "scheduler")

    def __init__(
        self,
        model: nn.Module,
        inner_optim: OptimizerFactory | Mapping[str, Any] | None = None,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        eval_report_steps: Sequence[int] | None = None,
        outer_optim: OptimizerFactory | Mapping[str, Any] | None = None,
        scheduler: SchedulerFactory | Mapping[str, Any] | None = None,
        first_order: bool = False,
        truncate: int | None = None,
        checkpoint_unroll: bool = False,
        adapted: Sequence[str] | None = None,
        learn_inner_lr: InnerLR | None = None,
        multi_step_loss: bool = False,
        task_type: Literal["auto", "classification", "regression"] = "auto",
        nan_policy: Literal["raise", "skip", "off"] = "raise",
        vectorize_tasks: bool | Literal["auto"] = "auto",
        adapt: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("inner_steps", inner_steps), ("eval_inner_steps", eval_inner_steps)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if nan_policy not in ("raise", "skip", "off"):
            raise ValueError(f"nan_policy must be 'raise', 'skip' or 'off', got {nan_policy!r}")
        if task_type not in ("auto", "classification", "regression"):
            raise ValueError(
                f"task_type must be 'auto', 'classification' or 'regression', got {task_type!r}"
            )
        self.model = model
        self.inner_steps = inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.eval_report_steps = sorted(
            {s for s in (eval_report_steps or []) if s != self.eval_inner_steps}
        )
        if any(s < 0 or s > self.eval_inner_steps for s in self.eval_report_steps):
            raise ValueError(
                f"eval_report_steps {list(eval_report_steps or [])} must lie in "
                f"0..eval_inner_steps ({self.eval_inner_steps})"
            )
        self.policy = UnrollPolicy(
            first_order=first_order, truncate=truncate, checkpoint=checkpoint_unroll
        )
        self.multi_step_loss = multi_step_loss
        self.task_type = task_type
        self.nan_policy = nan_policy
        # NaN/Inf checks, deferred to the end of each task in the training loop.
        self._finite = FiniteChecks()
        inner_optim = _default_inner_optim if inner_optim is None else inner_optim
        outer_optim = _default_outer_optim if outer_optim is None else outer_optim
        # Saved with the hyperparameters, so load_from_checkpoint rebuilds the same optimizers.
        self._factory_descriptions = {
            name: dict(value) if isinstance(value, Mapping) else describe_factory(value)
            for name, value in (
                ("inner_optim", inner_optim),
                ("outer_optim", outer_optim),
                ("scheduler", scheduler),
            )
        }
        self._inner_optim_factory = build_factory(inner_optim, "inner_optim")
        # The outer optimizer and scheduler matter for training only: a checkpoint that could
        # not store them still loads for adaptation and says so when training starts.
        self._outer_optim_factory = _factory_or_deferred_error(outer_optim, "outer_optim")
        self._scheduler_factory = (
            None if scheduler is None else _factory_or_deferred_error(scheduler, "scheduler")
        )

        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(
                f"{type(model).__name__} has no trainable parameters: meta-learning needs "
                "at least one parameter with requires_grad=True"
            )
        adapted, argument = resolve_adapted(adapted, adapt)
        self._adapted_names = select_adapted(adapted, trainable, model, argument)
        params = dict(model.named_parameters())
        adapted_params = [params[n] for n in self._adapted_names]
        # Rates learned per tensor need one group per adapted tensor; otherwise one group
        # keeps the per-step work small.
        per_tensor = learn_inner_lr in ("per_layer", "per_layer_per_step", "per_parameter")
        self.inner_optimizer = self._inner_optim_factory(
            [{"params": [p]} for p in adapted_params] if per_tensor else adapted_params
        )
        # Fail now, not at the first meta-step after data loading.
        differentiable_class(type(self.inner_optimizer))
        self.learn_inner_lr = learn_inner_lr
        self.inner_lrs = make_inner_lrs(
            learn_inner_lr,
            None if learn_inner_lr is None else base_lr(self.inner_optimizer),
            self._adapted_names,
            params,
            steps=max(self.inner_steps, self.eval_inner_steps),
        )
        self.save_hyperparameters(
            # adapt is saved as adapted (its value resolved above).
            ignore=["model", "inner_optim", "outer_optim", "scheduler", "adapt"],
            logger=False,
        )
        for name in self._saved_factories:
            self.hparams[name] = self._factory_descriptions[name]
        self._setup_metrics()
        if vectorize_tasks not in (True, False, "auto"):
            raise ValueError(
                f"vectorize_tasks must be true, false or 'auto', got {vectorize_tasks!r}"
            )
        self.vectorize_tasks = vectorize_tasks
        self._vectorized: bool | None = None
        # Query accuracies of the current task (train/acc), collected by note_query_output.
        self._query_accuracy: list[Tensor] | None = None
        self._vectorized_accuracy: Tensor | None = None  # per task, from the vectorised step
        # Under DDP: which meta-parameters got a meta-gradient since the last optimizer step.
        self._used_meta_params: list[bool] | None = None
        if vectorize_tasks is True:
            self.check_vectorizable()

    # --- configuration helpers ---------------------------------------------------------------
    def inner_override(self, step: int) -> dict[str, list[Any]] | None:
        """Hyperparameters of inner step ``step`` (learnable learning rates), or None."""
        return learned_rates_override(self.learn_inner_lr, self.inner_lrs, step)

    # --- hooks ----------------------------------------------------------------------------------
    def is_classification(self, target: Tensor) -> bool:
        """Whether ``target`` is a classification target (by ``task_type`` or its dtype)."""
        if self.task_type == "auto":
            return not torch.is_floating_point(target)
        return self.task_type == "classification"

    def inner_loss(self, output: Tensor, target: Tensor, task: Task) -> Tensor:
        """The loss minimised on the support set (cross-entropy or MSE by default)."""
        if self.is_classification(target):
            return F.cross_entropy(output, target)
        return F.mse_loss(output, target)

    def outer_loss(self, output: Tensor, target: Tensor, task: Task) -> Tensor:
        """The loss of the adapted model on the query set (the inner loss by default)."""
        return self.inner_loss(output, target, task)

    def adaptable_parameters(self) -> list[str]:
        """Names of the parameters the inner loop adapts."""
        return list(self._adapted_names)

    def meta_parameters(self) -> list[nn.Parameter]:
        """Everything the outer loop learns: trainable model weights and learnable rates."""
        return [p for p in self.parameters() if p.requires_grad]

    def make_inner_optimizer(
        self, fmodel: FunctionalModule, create_graph: bool
    ) -> DifferentiableOptimizer:
        """The differentiable inner optimizer for one task's unroll."""
        return get_diff_optim(
            self.inner_optimizer,
            fmodel.module_parameters,
            fmodel=fmodel,
            track_higher_grads=create_graph,
        )

    def adapt(
        self,
        support_x: Tensor | Task,
        support_y: Tensor | int | None = None,
        steps: int | None = None,
        *,
        create_graph: bool = False,
        on_step: StepCallback | None = None,
    ) -> Adaptation:
        """Adapt to a support set: ``module.adapt(support_x, support_y)``.

        The inner loop needs gradients, so it runs with them enabled even when the caller is
        under ``torch.no_grad()`` (or Lightning's evaluation); the result then predicts
        without a graph, and its fast weights are detached. Inference mode is refused: no
        gradient can be taken in it. The module's mode (train or eval) is the caller's, e.g.
        BatchNorm with running statistics in eval mode.

        Args:
            support_x: the support inputs ``[n, ...]``, or a whole :class:`Task` (its support
                set is used; the form the training and evaluation loops call).
            support_y: the support targets ``[n]`` (class labels) or ``[n, ...]``
                (regression); with a ``Task``, optionally the step count in its place
                (``adapt(task, steps)``).
            steps: inner steps (default: ``eval_inner_steps``).
            create_graph: keep the graph for the meta-gradient (training) or not.
            on_step: called as ``on_step(steps_done, predict)`` after every inner step.

        Returns:
            The :class:`Adaptation`: ``predict(x)``, and for classification
            ``predict_labels(x)`` and ``predict_proba(x)``.

        Example:
            >>> import torch
            >>> from metalight.algorithms import MAML
            >>> from metalight.models import MLP
            >>> module = MAML(MLP(), eval_inner_steps=5)
            >>> x = torch.linspace(-5, 5, 10).unsqueeze(-1)
            >>> with torch.no_grad():
            ...     adaptation = module.adapt(x, torch.sin(x))
            >>> adaptation.predict(x).shape
            torch.Size([10, 1])
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "adapt() takes gradients, which inference mode forbids: call it under "
                "torch.no_grad() instead (and use lightning.Trainer(inference_mode=False))"
            )
        task, steps = adapt_arguments(
            support_x,
            support_y,
            steps,
            model=self.model,
            default_steps=self.eval_inner_steps,
            is_classification=self.is_classification,
        )
        caller_grad = torch.is_grad_enabled()
        with torch.enable_grad():
            adaptation = self.adapt_task(task, steps, create_graph=create_graph, on_step=on_step)
        adaptation.classification = self.is_classification(task.support_y)
        adaptation._support_y = task.support_y
        adaptation._like = model_tensor(self.model)
        if not caller_grad:
            # The caller asked for no graph: nothing it gets back leads to the meta-parameters.
            adaptation.fast_params = [p.detach() for p in adaptation.fast_params]
            adaptation._no_grad = True
        return adaptation

    def adapt_task(
        self,
        task: Task,
        steps: int,
        *,
        create_graph: bool,
        on_step: StepCallback | None = None,
    ) -> Adaptation:
        """The hook behind :meth:`adapt`: ``steps`` differentiable inner steps on ``task``'s
        support set (gradients enabled). Algorithms with their own adaptation (ANIL)
        override this one.

        Args:
            task: the task (its query fields may be empty).
            steps: number of inner steps.
            create_graph: keep the graph for the meta-gradient (training) or not (eval).
            on_step: called as ``on_step(steps_done, predict)`` after every inner step.

        Returns:
            The :class:`Adaptation` (predictor with the adapted weights).
        """
        fmodel = monkeypatch(
            self.model, detach_initial_weights=False, track_higher_grads=create_graph
        )
        diffopt = self.make_inner_optimizer(fmodel, create_graph)
        self.unroll(
            fmodel,
            diffopt,
            lambda params: self.inner_loss(
                fmodel.call(params, task.support_x), task.support_y, task
            ),
            steps,
            create_graph,
            names=fmodel.parameter_names,
            after_step=None if on_step is None else lambda k: on_step(k, fmodel),
        )
        return Adaptation(fmodel, fmodel.fast_params or [])

    def unroll(
        self,
        fmodel: FunctionalModule,
        diffopt: DifferentiableOptimizer,
        support_loss: Callable[[list[Tensor]], Tensor],
        steps: int,
        create_graph: bool,
        names: list[str],
        after_step: Callable[[int], None] | None = None,
    ) -> None:
        """Run ``steps`` inner steps of ``diffopt`` on ``fmodel`` under the unroll policy.

        Args:
            fmodel: the functional view being adapted (its fast weights move on).
            diffopt: its differentiable optimizer.
            support_loss: the inner loss as a function of the fast weights.
            steps: number of inner steps.
            create_graph: keep the graph for the meta-gradient.
            names: the names of ``fmodel``'s fast weights, for error messages.
            after_step: called with the number of steps done after each step.

        Every inner loss is checked for NaN/Inf (one scalar check per step); when one
        appears the error names the step and the fast weights that went bad.
        """
        check = self.nan_policy != "off"

        def guard(loss: Tensor, step: int) -> None:
            if check:
                # The weights the loss was computed from, for the message (each step makes a
                # new list, so holding this one keeps them).
                self._finite.expect_inner_loss(loss, step, names, fmodel.fast_params or [])

        run_unroll(
            fmodel,
            diffopt,
            support_loss,
            steps,
            self.policy,
            create_graph=create_graph,
            override=self.inner_override,
            on_loss=guard,
            after_step=after_step,
        )
        if check and steps:
            self._finite.expect_final_weights(names, fmodel.fast_params or [], steps)

    def task_meta_gradient(
        self, task: Task, meta_params: list[nn.Parameter], scale: float
    ) -> tuple[Tensor, list[Tensor | None]]:
        """One task's query loss (detached) and its contribution to the meta-gradient.

        The default differentiates ``scale * outer_loss`` through the unroll. Algorithms with
        their own meta-gradient (Reptile, iMAML) override this.
        """
        steps = self.inner_steps
        step_losses: list[Tensor] = []

        def per_step(done: int, predict: Callable[[Tensor], Tensor]) -> None:
            if done < steps:
                step_losses.append(self.outer_loss(predict(task.query_x), task.query_y, task))

        adaptation = self.adapt(
            task, steps, create_graph=True, on_step=per_step if self.multi_step_loss else None
        )
        output = adaptation.predict(task.query_x)
        loss = self.outer_loss(output, task.query_y, task)
        self.note_query_output(output, task)
        if self.nan_policy != "off":
            self._finite.expect_query_loss(loss, steps)
        if step_losses:
            loss = torch.stack([*step_losses, loss]).mean()
        if not loss.requires_grad:
            return loss.detach(), [None] * len(meta_params)
        grads = torch.autograd.grad(loss * scale, meta_params, allow_unused=True)
        return loss.detach(), list(grads)

    def note_query_output(self, output: Tensor, task: Task) -> None:
        """Note a task's query outputs after adaptation, for ``train/acc`` (classification).

        Called by :meth:`task_meta_gradient`; an algorithm that overrides it calls this with
        the outputs it computed anyway (no extra forward pass).
        """
        if self._query_accuracy is not None and self.is_classification(task.query_y):
            with torch.no_grad():
                hits = (output.argmax(-1) == task.query_y).float().mean()
            self._query_accuracy.append(hits)

    # --- Lightning ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            check_strategy(self.trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hyperparameters = checkpoint.get("hyper_parameters")
        if (
            hyperparameters is not None
            and "inner_optim" in self._saved_factories
            and "inner_optim" not in hyperparameters
        ):
            # A Lightning checkpoint saved before checkpoints held the inner optimizer (a
            # weights-only dict has no hyperparameters: its loader builds from a config).
            self._warn(
                "this checkpoint does not record its inner optimizer (saved by an older "
                f"version): the module adapts with {self._factory_descriptions['inner_optim']}; "
                "if it was trained with another, pass inner_optim=... to load_from_checkpoint"
            )
        # Checked before Lightning loads anything, so a refused checkpoint leaves the module
        # as it was (torch's strict load would copy the matching tensors first).
        saved = checkpoint.get("state_dict", {})
        own = self.state_dict()
        problems = [
            f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} here"
            for k, v in saved.items()
            if k in own and isinstance(v, Tensor) and v.shape != own[k].shape
        ]
        missing = sorted(set(own) - set(saved))
        unexpected = sorted(set(saved) - set(own))
        if problems or missing or unexpected:
            details = "; ".join(
                [f"size mismatch for {p}" for p in problems[:5]]
                + ([f"missing keys {missing[:5]}"] if missing else [])
                + ([f"unexpected keys {unexpected[:5]}"] if unexpected else [])
            )
            raise RuntimeError(
                f"the checkpoint does not fit this {type(self).__name__} "
                f"({type(self.model).__name__}): {details}. Build the module with the "
                "configuration the checkpoint was trained with."
            )

    def forward(self, x: Tensor) -> Tensor:
        """The model with its meta-learned (unadapted) weights."""
        return self.model(x)

    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        if len(batch) == 0:
            raise ValueError(_empty_batch_message(batch_idx))
        if self._use_vectorized():
            return self._vectorized_training_step(batch, batch_idx)
        return self._loop_training_step(batch, batch_idx)

    def _use_vectorized(self) -> bool:
        if self._vectorized is None:
            self._vectorized = self._decide_vectorized()
        return self._vectorized

    def _decide_vectorized(self) -> bool:
        if self.vectorize_tasks != "auto":
            return bool(self.vectorize_tasks)
        if any(isinstance(m, nn.modules.conv._ConvNd) for m in self.model.modules()):
            return False
        try:
            self.check_vectorizable()
        except ValueError:
            return False
        return True

    # --- task-vectorised meta-step (metalight.vectorized) ----------------------------------------
    def check_vectorizable(self) -> None:
        """Raise a ``ValueError`` naming what keeps this module from task-vectorised steps.

        The default inner loop (or one the vectorised step reproduces, see
        ``vectorized_hooks``), and :func:`~metalight.vectorized.check_vectorizable_model`.
        """
        if self._overridden_loop_hooks:
            hook = self._overridden_loop_hooks[0]
            raise ValueError(
                f"{type(self).__name__} overrides {hook}(): task-vectorised adaptation "
                "re-implements MetaLearningModule's default inner loop only, so it would not "
                "compute this algorithm's meta-gradient; use the per-task loop (training_step)"
            )
        check_vectorizable_model(self.model, self.policy)

    def functional_forward(self, values: dict[str, Tensor], x: Tensor) -> Tensor:
        """The model's output for ``x`` with ``values`` (by ``named_parameters()`` and buffer
        names) replacing its tensors; what the task-vectorised step runs under ``vmap``.
        An algorithm whose adaptation calls the model differently (ANIL) overrides it."""
        return functional_call(self.model, values, (x,))

    def vectorized_adaptation(self, batch: TaskBatch, *, graph: bool) -> VectorizedUnroll:
        """All tasks of ``batch`` adapted at once with this module's ingredients.

        :func:`metalight.vectorized.vectorized_unroll` with the inner optimizer, losses,
        ``inner_steps``, unroll policy, adapted parameters, learnable rates,
        ``multi_step_loss``, :meth:`functional_forward` and NaN policy of this module.
        """
        self.check_vectorizable()
        return vectorized_unroll(
            self.model,
            lambda fmodel: self.make_inner_optimizer(fmodel, True),
            batch,
            self.inner_loss,
            self.outer_loss,
            self.inner_steps,
            self.policy,
            adapted=self.adaptable_parameters(),
            override=self.inner_override,
            multi_step_loss=self.multi_step_loss,
            forward=self.functional_forward,
            classification=len(batch) > 0 and self.is_classification(batch.query_y),
            check_finite=self.nan_policy != "off",
            nonfinite_error=NonFiniteError,
            graph=graph,
        )

    def vectorized_task_losses(self, batch: TaskBatch) -> Tensor:
        """Each task's query loss, differentiable (see
        :func:`metalight.vectorized.vectorized_task_losses`)."""
        if type(self).vectorized_meta_gradient is not MetaLearningModule.vectorized_meta_gradient:
            raise ValueError(
                f"{type(self).__name__}'s meta-gradient is not the gradient of its query losses "
                "(it defines its own vectorised meta-gradient): use its training_step"
            )
        return self.vectorized_adaptation(batch, graph=True).losses

    def vectorized_meta_gradient(
        self, batch: TaskBatch, meta_params: list[nn.Parameter]
    ) -> tuple[Tensor, list[Tensor | None]]:
        """Each task's query loss and the meta-gradient of their mean, all tasks at once.

        What :meth:`task_meta_gradient` gives task by task, summed over the meta-batch with
        scale ``1 / len(batch)``. Algorithms whose meta-gradient is not the gradient of the
        query loss (Reptile) override both.
        """
        unrolled = self.vectorized_adaptation(batch, graph=True)
        losses, self._vectorized_accuracy = unrolled.losses, unrolled.accuracy
        meta_loss = losses.mean()
        grads: list[Tensor | None] = (
            list(torch.autograd.grad(meta_loss, meta_params, allow_unused=True))
            if meta_loss.requires_grad
            else [None] * len(meta_params)
        )
        return losses, grads

    def _vectorized_training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        meta_params = self.meta_parameters()
        grads: list[Tensor | None] = []
        try:
            losses, grads = self.vectorized_meta_gradient(batch, meta_params)
        except NonFiniteError:
            bad = True
        else:
            meta_loss = losses.mean()
            bad = self.nan_policy != "off" and not _all_finite(grads)
        if self.nan_policy != "off":
            # The loop agrees on the kept-task count (skip) or on a failure (raise) with a
            # collective; a rank that went the vectorised way would never join it, so every
            # rank takes the same path.
            bad = on_any_rank(self._trainer, bad, self.device)
        if bad:
            # The loop names the task, step and weights (or drops the bad tasks): on this rare
            # path, run the batch again task by task.
            return self._loop_training_step(batch, batch_idx)
        meta_loss = meta_loss.detach()
        self._log(
            "train/meta_loss", meta_loss, prog_bar=True, batch_size=len(batch), sync_dist=True
        )
        accuracy, self._vectorized_accuracy = self._vectorized_accuracy, None
        if accuracy is not None:
            self._log_train_accuracy(accuracy, len(batch))
        return self._surrogate(meta_params, grads, meta_loss)

    def _loop_training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        meta_params = self.meta_parameters()
        accumulated: list[Tensor | None] = [None] * len(meta_params)
        losses = []
        accuracies: list[Tensor] = []
        n = len(batch)
        check = self.nan_policy != "off"
        failure: NonFiniteError | None = None
        for index in range(n):
            task = batch[index]
            # The task's NaN/Inf checks (each inner loss, the final weights, the query loss,
            # the meta-gradient) wait for its end and cost one host sync together; the first
            # one that fails raises as it would have at its place.
            self._query_accuracy = []
            try:
                with self._finite.deferred(enabled=check):
                    loss, grads = self.task_meta_gradient(task, meta_params, 1.0 / n)
                    if check:
                        self._finite.expect_meta_gradient(grads)
            except NonFiniteError as err:
                if self.nan_policy != "skip":
                    failure = NonFiniteError(f"task {index} of batch {batch_idx}: {err}")
                    failure.__cause__ = err
                    break
                self._warn_skipped(index, batch_idx, err)
                continue
            finally:
                task_accuracy, self._query_accuracy = self._query_accuracy, None
            losses.append(loss)
            accuracies.extend(task_accuracy)
            for i, g in enumerate(grads):
                if g is not None:
                    accumulated[i] = g if accumulated[i] is None else accumulated[i] + g
        if self.nan_policy == "raise":
            raise_on_any_rank(self._trainer, failure, batch_idx, self.device)
        kept, total = len(losses), n
        if self.nan_policy == "skip":
            # Every rank must agree on how many tasks were kept: DDP averages ranks equally,
            # and a rank that raised alone would leave the others waiting in the all-reduce.
            kept, total = global_counts(self._trainer, len(losses), n, self.device)
        if kept == 0:
            raise NonFiniteError(
                f"every task of batch {batch_idx} was skipped for non-finite values"
            )
        meta_loss = torch.stack(losses).mean() if losses else _zero_loss(meta_params)
        self._log("train/meta_loss", meta_loss, prog_bar=True, batch_size=n, sync_dist=True)
        if accuracies:
            self._log_train_accuracy(torch.stack(accuracies), len(accuracies))
        if kept < total:
            # Skipped tasks contribute nothing; rescale so the kept ones form a mean.
            factor = total / kept
            accumulated = [g * factor if g is not None else None for g in accumulated]
        return self._surrogate(meta_params, accumulated, meta_loss)

    def _surrogate(
        self, meta_params: list[nn.Parameter], grads: list[Tensor | None], value: Tensor
    ) -> Tensor:
        distributed = is_distributed(self._trainer)
        if distributed:
            # on_before_optimizer_step turns back to None the .grad of what no rank used.
            self._used_meta_params = merge_used(self._used_meta_params, grads)
        return meta_gradient_surrogate(meta_params, grads, value, distributed=distributed)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        used, self._used_meta_params = self._used_meta_params, None
        if used is None:
            return
        # Parameters used on no rank in any batch of this (accumulated) step.
        for p, flag in zip(
            self.meta_parameters(), used_on_any_rank(self._trainer, used, self.device), strict=True
        ):
            if not flag:
                p.grad = None

    def _log_train_accuracy(self, accuracies: Tensor, n: int) -> None:
        self._log("train/acc", accuracies.mean(), prog_bar=True, batch_size=n, sync_dist=True)

    def _warn_skipped(self, index: int, batch_idx: int, err: Exception) -> None:
        self._warn(f"skipping task {index} of batch {batch_idx}: {err}")
        self._log("train/skipped_tasks", 1.0, reduce_fx="sum", batch_size=1)

    @staticmethod
    def _warn(message: str) -> None:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(message)

    def _log(self, name: str, value: Any, **kwargs: Any) -> None:
        # Steps may run outside a Trainer (tests, notebooks); logging then has nowhere to go.
        if self._trainer is not None:
            self.log(name, value, **kwargs)

    # --- evaluation -----------------------------------------------------------------------------
    def _setup_metrics(self) -> None:
        self._metrics = EpisodeMetrics(self.eval_report_steps)

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        evaluate_batch(self, batch, "val", batch_idx)

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        evaluate_batch(self, batch, "test", batch_idx)

    def on_validation_epoch_end(self) -> None:
        log_episode_metrics(self, "val")

    def on_test_epoch_end(self) -> None:
        log_episode_metrics(self, "test")

    # --- optimizers -----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self._outer_optim_factory(self.meta_parameters())
        if self._scheduler_factory is None:
            return optimizer
        scheduler = self._scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
