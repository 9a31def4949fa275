"""``BilevelModule``: a Lightning base class whose training step differentiates a training loop.

One outer step: continue training the inner model for ``inner_steps`` differentiable steps on
training batches (any built-in differentiable optimizer; plain, truncated or checkpointed
unroll), compute the outer loss on a validation batch with the trained weights, and return it
to Lightning, whose backward fills the gradients of the meta-parameters (every parameter of
the module outside ``model``) and whose outer optimizer steps them. The inner weights and
optimizer state carry over to the next outer step (online hypergradients) unless
``restart_every`` says to start again; they are saved in every checkpoint, so a resumed run
continues exactly.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalight.bilevel.unroll import detach_state, unroll, update_per_parameter
from metalight.data.streams import derive_seed
from metalight.data.task import TaskBatch
from metalight.optim.functional import BY_TORCH_CLASS, FunctionalOptimizer

__all__ = ["BilevelModule", "InnerBatch", "SplitSource", "mean_ci95", "pop_baseline"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
CHECKPOINT_KEY = "bilevel_inner"

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (then ~normal).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (Student's t) over ``values``.

    Example:
        >>> mean, half = mean_ci95([0.9, 0.92, 0.94])
        >>> round(mean, 3), round(half, 3)
        (0.92, 0.05)
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci95 needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return mean, t * sd / math.sqrt(n)


def pop_baseline(metrics: dict[str, float]) -> dict[str, float]:
    """Move a run's ``baseline/...`` test metrics out of ``metrics``, renamed ``test/...``.

    A :class:`BilevelModule` logs its plain counterpart under ``baseline/``; results list it
    apart, in the same names as the method's, so that both print the same way.

    Example:
        >>> metrics = {"test/acc_post": 0.9, "baseline/acc_post": 0.8}
        >>> pop_baseline(metrics), metrics
        ({'test/acc_post': 0.8}, {'test/acc_post': 0.9})
    """
    keys = [key for key in metrics if key.startswith("baseline/")]
    return {"test/" + key.removeprefix("baseline/"): metrics.pop(key) for key in keys}


class InnerBatch(NamedTuple):
    """The training examples of one inner step.

    Attributes:
        x: inputs ``[B, ...]``.
        y: labels ``[B]``.
        rows: each example's row in the training split ``[B]`` (per-example weights).
    """

    x: Tensor
    y: Tensor
    rows: Tensor


class SplitSource(Protocol):
    """A data module that hands out whole splits (the evaluation and baselines need them)."""

    def split_tensors(self, split: str) -> tuple[Tensor, Tensor]:
        """``(inputs, labels)`` of ``"train"``, ``"val"`` or ``"test"``."""
        ...


class _OnDevice:
    """A split source whose tensors come on the module's device (other attributes pass)."""

    def __init__(self, source: Any, device: torch.device) -> None:
        self._source, self._device = source, device

    def split_tensors(self, split: str) -> tuple[Tensor, Tensor]:
        x, y = self._source.split_tensors(split)
        return x.to(self._device), y.to(self._device)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


def _default_inner_optim(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)


def _default_outer_optim(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-2)


def _functional(factory: OptimizerFactory) -> tuple[FunctionalOptimizer, dict[str, Any]]:
    probe = factory([nn.Parameter(torch.zeros(1))])
    opt = BY_TORCH_CLASS.get(type(probe))
    if opt is None:
        known = ", ".join(sorted(c.__name__ for c in BY_TORCH_CLASS))
        raise TypeError(
            f"inner_optim builds a {type(probe).__name__}, which has no differentiable "
            f"functional version; use one of {known}"
        )
    return opt, {k: v for k, v in probe.defaults.items() if k in opt.defaults}


class BilevelModule(L.LightningModule):
    """A bilevel problem: meta-parameters of a training loop, learned through its unroll.

    The inner problem trains ``model``'s weights (a functional copy: ``model`` itself keeps
    the starting weights and is never trained) with ``inner_optim``; the outer problem
    learns every other parameter of the module (the meta-parameters) by gradient descent on
    the validation loss after ``inner_steps`` inner steps. Subclasses declare their
    meta-parameters as ``nn.Parameter`` attributes and read them in one of two hooks:

    * :meth:`inner_loss` for anything about the loss or the data (per-example weights,
      synthetic data, a learned loss network, augmentation parameters);
    * :meth:`inner_hparams` for the optimizer's hyperparameters (learning rates, weight
      decay, their schedule over the unroll).

    With ``checkpoint_unroll=True`` the hooks run again in the backward pass with stand-ins
    for the meta-parameters: read them as attributes of ``self`` inside the hooks (they are
    swapped there), never from tensors captured earlier.

    Validation scores the current inner weights on the validation split. Test logs the
    method (``test/acc_post``...) and, when :meth:`evaluate_baseline` gives one, its plain
    counterpart measured the same way (``baseline/acc_post``...). Use a
    ``Trainer(inference_mode=False)``.

    Args:
        model: the network trained in the inner loop (its weights are the starting point).
        inner_optim: builds the inner ``torch.optim`` optimizer (e.g.
            ``functools.partial(torch.optim.SGD, lr=0.1)``); its class needs a functional
            version (:data:`metalight.optim.functional.BY_TORCH_CLASS`).
        inner_steps: differentiable inner steps per outer step (``k``).
        truncate: the hypergradient flows through the last ``truncate`` inner steps only
            (None: all ``k``).
        checkpoint_unroll: recompute each inner step in the backward pass instead of keeping
            its activations (memory ~ ``k`` copies of weights and optimizer state).
        restart_every: start the inner training again every this many outer steps (1: every
            outer step, as in dataset distillation); None: never (online).
        init: where a (re)start begins: ``"fixed"`` (``model``'s weights) or ``"random"``
            (a fresh initialisation drawn from ``seed`` and the outer step).
        outer_optim: builds the outer optimizer from the meta-parameters (default Adam 1e-2).
        scheduler: builds an LR scheduler from the outer optimizer (stepped per step).
        seed: seeds the random (re)initialisations and the baselines' batches.

    Example:
        >>> import functools, torch
        >>> from metalight.bilevel import BilevelModule
        >>> class LearnedLR(BilevelModule):
        ...     def __init__(self, model, **kwargs):
        ...         super().__init__(model, **kwargs)
        ...         self.log_lr = torch.nn.Parameter(torch.tensor(-2.0))
        ...     def inner_hparams(self, step):
        ...         return [{"lr": self.log_lr.exp()}] * len(self.inner_names)
        >>> module = LearnedLR(torch.nn.Linear(64, 10), inner_steps=20, truncate=10)
        >>> [name for name, _ in module.named_meta_parameters()]
        ['log_lr']
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optim: OptimizerFactory | None = None,
        inner_steps: int = 20,
        truncate: int | None = None,
        checkpoint_unroll: bool = False,
        restart_every: int | None = None,
        init: Literal["fixed", "random"] = "fixed",
        outer_optim: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")
        if truncate is not None and (not isinstance(truncate, int) or truncate < 1):
            raise ValueError(
                f"truncate must be null or an integer >= 1 (the last inner steps the "
                f"hypergradient flows through), got {truncate!r}"
            )
        if restart_every is not None and (not isinstance(restart_every, int) or restart_every < 1):
            raise ValueError(
                f"restart_every must be null (never restart) or an integer >= 1 (outer steps), "
                f"got {restart_every!r}"
            )
        if init not in ("fixed", "random"):
            raise ValueError(f"init must be 'fixed' or 'random', got {init!r}")
        self.model = model.requires_grad_(False)
        self.inner_names = [name for name, _ in model.named_parameters()]
        self.inner_steps = inner_steps
        self.truncate = truncate
        self.checkpoint_unroll = checkpoint_unroll
        self.restart_every = restart_every
        self.init = init
        self.seed = int(seed)
        self.inner_opt, self.base_hparams = _functional(inner_optim or _default_inner_optim)
        self._outer_optim_factory = outer_optim or _default_outer_optim
        self._scheduler_factory = scheduler
        # The inner training in progress: weights, optimizer state, outer steps since start.
        self.inner_params: list[Tensor] | None = None
        self.inner_state: Any = None
        self.inner_age = 0

    # ----------------------------------------------------------------- hooks to override
    def inner_loss(self, params: list[Tensor], batch: InnerBatch, step: int) -> Tensor:
        """The inner (training) loss of inner step ``step`` with weights ``params``.

        Default: the mean cross-entropy on ``batch``. Override to bring in meta-parameters
        of the loss or the data (read them as attributes of ``self``).
        """
        return F.cross_entropy(self.predict(params, batch.x), batch.y)

    def inner_hparams(self, step: int) -> list[dict[str, Any]]:
        """The inner optimizer's hyperparameters at inner step ``step``, one dict per weight
        tensor of ``model`` (in ``inner_names`` order). Default: ``inner_optim``'s, fixed.
        """
        return [self.base_hparams] * len(self.inner_names)

    def outer_loss(self, params: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
        """The outer (validation) loss of the trained weights. Default: cross-entropy."""
        return F.cross_entropy(self.predict(params, x), y)

    def evaluate_method(self, splits: SplitSource) -> dict[str, float]:
        """Test metrics of the method (``acc``, ``acc_ci95``, ``loss``, ...).

        Default: the current inner weights scored on the test split.
        """
        params = self.current_inner()[0]
        return self.score(params, *splits.split_tensors("test"))

    def evaluate_baseline(self, splits: SplitSource) -> dict[str, float] | None:
        """Test metrics of the plain counterpart of the method, or None (no baseline)."""
        return None

    # ------------------------------------------------------------------------ machinery
    def named_meta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The meta-parameters: every trainable parameter of the module outside ``model``."""
        for name, param in self.named_parameters():
            if not name.startswith("model.") and param.requires_grad:
                yield name, param

    def predict(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        """``model``'s output on ``x`` with the weights ``params`` (``inner_names`` order)."""
        weights = dict(zip(self.inner_names, params, strict=True))
        buffers = dict(self.model.named_buffers())
        return torch.func.functional_call(self.model, (weights, buffers), (x,))

    def score(self, params: Sequence[Tensor], x: Tensor, y: Tensor) -> dict[str, float]:
        """Accuracy (with its binomial 95% CI over the examples) and loss on ``(x, y)``."""
        with torch.no_grad():
            logits = self.predict([p.detach() for p in params], x)
            acc = float((logits.argmax(-1) == y).double().mean())
            loss = float(F.cross_entropy(logits, y))
        return {"acc": acc, "acc_ci95": 1.96 * math.sqrt(acc * (1 - acc) / len(y)), "loss": loss}

    def fresh_inner(self, generator_seed: int | None = None) -> list[Tensor]:
        """Starting weights: ``model``'s, or a fresh random initialisation of it."""
        if generator_seed is None:
            return [p.detach().clone() for p in self.model.parameters()]
        model = copy.deepcopy(self.model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator_seed)
            for module in model.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
        return [p.detach().to(self.device) for p in model.parameters()]

    def current_inner(self) -> tuple[list[Tensor], Any]:
        """The inner weights and optimizer state to continue from (started if needed)."""
        if self.inner_params is None:
            self._restart()
        assert self.inner_params is not None
        device = self.device
        params = [p.to(device) for p in self.inner_params]
        state = type(self.inner_state)(
            *[[v.to(device) if isinstance(v, Tensor) else v for v in column]
              for column in self.inner_state]
        )  # fmt: skip
        return params, state

    def _restart(self) -> None:
        seed = None
        if self.init == "random":
            seed = derive_seed(self.seed, "init", int(self.global_step_or_zero))
        params = self.fresh_inner(seed)
        self.inner_params = params
        self.inner_state = self.inner_opt.init(params, **self.base_hparams)
        self.inner_age = 0

    @property
    def global_step_or_zero(self) -> int:
        """The trainer's global step, or 0 outside a trainer."""
        trainer = self._trainer
        return int(trainer.global_step) if trainer is not None else 0

    @contextlib.contextmanager
    def bound_meta(self, tensors: Sequence[Tensor]) -> Iterator[None]:
        """Within it, the meta-parameter attributes of the module read as ``tensors``."""
        named = list(self.named_meta_parameters())
        if len(tensors) != len(named):
            raise ValueError(f"got {len(tensors)} tensors for {len(named)} meta-parameters")
        if all(t is p for t, (_, p) in zip(tensors, named, strict=True)):
            yield
            return
        saved = []
        try:
            for (name, param), tensor in zip(named, tensors, strict=True):
                owner = self.get_submodule(name.rpartition(".")[0])
                leaf = name.rpartition(".")[2]
                saved.append((owner, leaf, param))
                # Written into the parameter table directly: attribute assignment would
                # refuse a plain tensor for a registered parameter.
                owner._parameters[leaf] = tensor  # type: ignore[assignment]
            yield
        finally:
            for owner, leaf, param in saved:
                owner._parameters[leaf] = param

    def unroll_inner(
        self,
        batches: Sequence[InnerBatch],
        params: list[Tensor],
        state: Any,
        *,
        steps: int | None = None,
        first_step: int = 0,
        truncate: int | Literal["default"] | None = "default",
    ) -> tuple[list[Tensor], Any, list[Tensor]]:
        """Run the differentiable inner loop from ``(params, state)`` over ``batches``.

        Inner step ``s`` (numbered from ``first_step``) trains on ``batches[s % len]``;
        ``truncate`` overrides the module's.

        Returns:
            The trained weights (differentiable w.r.t. the meta-parameters), the optimizer
            state and each step's inner loss.
        """
        steps = len(batches) if steps is None else steps
        meta = [p for _, p in self.named_meta_parameters()]

        def inner_loss(weights: list[Tensor], own: Sequence[Tensor], step: int) -> Tensor:
            with self.bound_meta(own):
                return self.inner_loss(weights, batches[step % len(batches)], step)

        def hparams(own: Sequence[Tensor], step: int) -> list[dict[str, Any]]:
            with self.bound_meta(own):
                return self.inner_hparams(step)

        result = unroll(
            self.inner_opt,
            params,
            state,
            inner_loss,
            hparams,
            steps,
            meta=meta,
            truncate=self.truncate if truncate == "default" else truncate,
            checkpoint=self.checkpoint_unroll,
            first_step=first_step,
            module=self.model,
        )
        return result.params, result.state, result.losses

    def fit_plain(
        self,
        params: Sequence[Tensor],
        batches: Callable[[int], InnerBatch],
        steps: int,
        hparams: Sequence[Mapping[str, Any]] | None = None,
        loss: Callable[[list[Tensor], InnerBatch, int], Tensor] | None = None,
    ) -> list[Tensor]:
        """Train ``params`` without any graph (baselines, evaluation runs).

        Args:
            params: starting weights.
            batches: step -> the batch of that step.
            steps: the number of steps.
            hparams: one hyperparameter dict per weight (default ``inner_optim``'s).
            loss: ``(params, batch, step) -> loss`` (default: mean cross-entropy).
        """
        hparams = hparams or [self.base_hparams] * len(self.inner_names)
        current = [p.detach().clone() for p in params]
        state = self.inner_opt.init(current, **self.base_hparams)
        for step in range(steps):
            batch = batches(step)
            with torch.enable_grad():
                leaves = [p.requires_grad_(True) for p in current]
                value = (
                    loss(leaves, batch, step)
                    if loss is not None
                    else F.cross_entropy(self.predict(leaves, batch.x), batch.y)
                )
                grads = torch.autograd.grad(value, leaves)
            with torch.no_grad():
                current, state = update_per_parameter(
                    self.inner_opt, grads, state, [p.detach() for p in leaves], hparams
                )
            current = [p.detach() for p in current]
            state = detach_state(state)
        return current

    @staticmethod
    def minibatches(
        x: Tensor, y: Tensor, batch_size: int, seed: int
    ) -> Callable[[int], InnerBatch]:
        """Step -> a minibatch drawn without replacement, a pure function of ``seed``."""

        def batch(step: int) -> InnerBatch:
            generator = torch.Generator().manual_seed(derive_seed(seed, "minibatch", step))
            index = torch.randperm(len(y), generator=generator)[:batch_size].to(y.device)
            return InnerBatch(x[index], y[index], index)

        return batch

    def _splits(self) -> SplitSource:
        datamodule = getattr(self.trainer, "datamodule", None)
        if not callable(getattr(datamodule, "split_tensors", None)):
            raise TypeError(
                f"{type(self).__name__} is tested on whole data splits: train it with a data "
                "module that has split_tensors(split), e.g. metalight.data.digits."
                "DigitsDataModule"
            )
        return _OnDevice(datamodule, self.device)

    def _inner_batches(self, batch: TaskBatch) -> tuple[list[InnerBatch], Tensor, Tensor]:
        if len(batch) != 1:
            raise ValueError(
                f"{type(self).__name__} takes one outer step's data per process, got "
                f"{len(batch)}: set data.meta_batch_size to the number of devices"
            )
        task = batch[0]
        k, n = self.inner_steps, task.support_x.shape[0]
        if n % k:
            raise ValueError(
                f"the outer step brought {n} training examples, not a multiple of inner_steps "
                f"({k}): the data module's inner_steps must equal the algorithm's"
            )
        size = n // k
        xs = task.support_x.reshape(k, size, *task.support_x.shape[1:])
        ys = task.support_y.reshape(k, size)
        index = task.info.reshape(k, size)
        batches = [InnerBatch(xs[i], ys[i], index[i]) for i in range(k)]
        return batches, task.query_x, task.query_y

    # ------------------------------------------------------------------ Lightning hooks
    def forward(self, x: Tensor) -> Tensor:
        """The current inner model's output on ``x``."""
        return self.predict(self.current_inner()[0], x)

    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        """One outer step: ``inner_steps`` differentiable steps, then the validation loss."""
        batches, val_x, val_y = self._inner_batches(batch)
        if self.restart_every is not None and self.inner_age >= self.restart_every:
            self._restart()
        params, state = self.current_inner()
        params, state, losses = self.unroll_inner(batches, params, state)
        outer = self.outer_loss(params, val_x, val_y)
        self.inner_params = [p.detach() for p in params]
        self.inner_state = detach_state(state)
        self.inner_age += 1
        if self._trainer is not None:  # also callable by hand, outside a Trainer
            with torch.no_grad():
                acc = (self.predict(self.inner_params, val_x).argmax(-1) == val_y).float().mean()
            self.log("train/inner_loss", losses[-1], prog_bar=True, batch_size=1)
            self.log("train/outer_loss", outer.detach(), prog_bar=True, batch_size=1)
            self.log("train/outer_acc", acc, batch_size=1)
        return outer

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        """Scores the current inner weights on the validation examples of ``batch``."""
        for task in batch:
            metrics = self.score(self.current_inner()[0], task.query_x, task.query_y)
            self.log("val/acc", metrics["acc"], sync_dist=True, batch_size=1)
            self.log("val/loss", metrics["loss"], sync_dist=True, batch_size=1)

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        """Logs the method's and the baseline's test metrics (on whole splits)."""
        if batch_idx:
            return
        splits = self._splits()
        with torch.enable_grad():
            method = self.evaluate_method(splits)
            baseline = self.evaluate_baseline(splits)
        for prefix, metrics in (("test", method), ("baseline", baseline or {})):
            for key, value in metrics.items():
                name = {"acc": "acc_post", "acc_ci95": "acc_post_ci95", "loss": "loss_post"}
                self.log(
                    f"{prefix}/{name.get(key, key)}", float(value), batch_size=1, sync_dist=True
                )

    def configure_optimizers(self) -> Any:
        """The outer optimizer over the meta-parameters (and its scheduler, per step)."""
        meta = [p for _, p in self.named_meta_parameters()]
        if not meta:
            raise ValueError(
                f"{type(self).__name__} has no meta-parameters: declare them as nn.Parameter "
                "attributes outside `model` and read them in inner_loss or inner_hparams"
            )
        optimizer = self._outer_optim_factory(meta)
        if self._scheduler_factory is None:
            return optimizer
        scheduler = self._scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _inner_entry(self) -> dict[str, Any] | None:
        if self.inner_params is None:
            return None
        return {
            "params": [p.detach().cpu() for p in self.inner_params],
            "state": {
                field: [v.detach().cpu() if isinstance(v, Tensor) else v for v in column]
                for field, column in zip(self.inner_state._fields, self.inner_state, strict=True)
            },
            "age": self.inner_age,
            "optimizer": self.inner_opt.name,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Saves the inner training in progress (weights, optimizer state, age).

        Under DDP every process trains its own inner model on its own share of the data:
        all of them are gathered (every process calls this hook) and saved under ``ranks``.
        """
        entry = self._inner_entry()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, entry)
            checkpoint[CHECKPOINT_KEY] = {**(ranks[0] or {}), "ranks": ranks}
            return
        checkpoint[CHECKPOINT_KEY] = entry

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores the inner training saved by :meth:`on_save_checkpoint` (this process's)."""
        saved = checkpoint.get(CHECKPOINT_KEY)
        ranks = saved.get("ranks") if isinstance(saved, dict) else None
        if ranks is not None:
            trainer = self._trainer
            # Without a trainer (evaluating a checkpoint) the first process's model is used.
            world = int(trainer.world_size) if trainer is not None else len(ranks)
            if world != len(ranks):
                raise ValueError(
                    f"the checkpoint holds the inner training of {len(ranks)} processes, this "
                    f"run has {world}: resume with trainer.devices={len(ranks)}"
                )
            saved = ranks[self.global_rank if trainer is not None else 0]
        if not saved:
            self.inner_params, self.inner_state, self.inner_age = None, None, 0
            return
        if saved["optimizer"] != self.inner_opt.name:
            raise ValueError(
                f"the checkpoint's inner training used {saved['optimizer']}, this run "
                f"{self.inner_opt.name}: resume with the checkpoint's inner_optim"
            )
        shapes = [tuple(p.shape) for p in self.model.parameters()]
        if [tuple(p.shape) for p in saved["params"]] != shapes:
            raise ValueError(
                "the checkpoint's inner weights do not fit this model: resume with the "
                "model configuration the checkpoint was trained with"
            )
        self.inner_params = list(saved["params"])
        self.inner_state = self.inner_opt.state_type(**saved["state"])
        self.inner_age = int(saved["age"])
