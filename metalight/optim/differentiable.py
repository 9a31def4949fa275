"""Stateful differentiable optimizers, with higher's extension protocol.

A :class:`DifferentiableOptimizer` is branched from a ``torch.optim.Optimizer`` (its
hyperparameters, parameter groups and state) and then steps *fast weights* out of place:
``new_params = diffopt.step(loss)`` keeps every new weight a differentiable function of
the weights the unroll started from, of the optimizer's state and of any hyperparameter
given as a tensor that requires grad.

Built-in optimizers are thin layers over the pure functions of
:mod:`metalight.optim.functional`. A custom one subclasses :class:`DifferentiableOptimizer`,
implements ``_update(grouped_grads, **kwargs)`` by writing new tensors into
``self.param_groups[g]['params'][i]`` (state lives in ``self.state[g][i]``), and is made
known with :func:`metalight.optim.register_optim`.
"""

from __future__ import annotations

import collections
import contextlib
import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from metalight.optim.functional import FunctionalOptimizer

if TYPE_CHECKING:
    from metalight.unroll import UnrollPolicy

__all__ = ["DifferentiableOptimizer", "FunctionalCoreOptimizer", "GradCallback", "Override"]

GradCallback = Callable[[list[Tensor | None]], Sequence[Tensor | None]]
Override = Mapping[str, Any]


def _is_per_group(value: Any) -> bool:
    return isinstance(value, list)


class DifferentiableOptimizer:
    """Base class of differentiable optimizers (higher's protocol).

    Args:
        other: the ``torch.optim.Optimizer`` to branch from: hyperparameters, groups and
            state (``exp_avg``, ``step``, ...) are copied, never shared.
        reference_params: the parameters ``other`` was built over, in the order the fast
            weights use (``model.parameters()``).
        fmodel: a :class:`~metalight.functional.FunctionalModule` whose fast weights ``step``
            reads and updates. Without one, pass ``params=`` to ``step``.
        device: where to copy the optimizer state.
        override: per-group hyperparameters replacing ``other``'s, e.g.
            ``{"lr": [lr_tensor]}`` (one value for all groups, or one per group). Tensors
            that require grad make the hyperparameter learnable.
        grad_callback: applied to the list of gradients before each update (e.g. clipping).
        track_higher_grads: keep the graph through each step (False gives a cheap test mode
            whose fast weights are detached after every step).
        first_order: compute gradients without a graph of their own while keeping the
            update differentiable w.r.t. the weights (first-order MAML for any optimizer).

    Example:
        >>> import torch
        >>> import metalight
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> fmodel = metalight.monkeypatch(model, copy_initial_weights=False)
        >>> diffopt = metalight.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
        >>> new_params = diffopt.step(fmodel(torch.randn(5, 3)).pow(2).mean())
    """

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Iterable[Tensor],
        fmodel: Any = None,
        device: torch.device | str | None = None,
        override: Override | None = None,
        grad_callback: GradCallback | None = None,
        track_higher_grads: bool = True,
        first_order: bool = False,
        **kwargs: Any,
    ) -> None:
        reference_params = list(reference_params)
        index_of = {id(p): i for i, p in enumerate(reference_params)}
        self.param_groups: list[dict[str, Any]] = []
        self.state: list[collections.defaultdict[int, dict[str, Any]]] = []
        self._group_to_param_list: list[list[int]] = []
        for group_idx, group in enumerate(other.param_groups):
            indices = []
            state: collections.defaultdict[int, dict[str, Any]] = collections.defaultdict(dict)
            for p_idx, p in enumerate(group["params"]):
                index = index_of.get(id(p))
                if index is None:
                    raise ValueError(
                        f"parameter {p_idx} of group {group_idx} of {type(other).__name__} "
                        f"(shape {tuple(p.shape)}) is not among the reference parameters: build "
                        "the optimizer over the same module whose parameters you pass (usually "
                        "model.parameters())"
                    )
                indices.append(index)
                if other.state.get(p):
                    state[p_idx] = {
                        k: self._copy_state_value(k, v, device) for k, v in other.state[p].items()
                    }
            # A shallow copy: hyperparameters are replaced, never mutated, and a tensor
            # hyperparameter must stay the same tensor for its gradient to flow.
            hyper = {k: v for k, v in group.items() if k != "params"}
            self.param_groups.append({**hyper, "params": [None] * len(indices)})
            self.state.append(state)
            self._group_to_param_list.append(indices)
        self._num_params = len(reference_params)
        self._stepped = sorted({i for indices in self._group_to_param_list for i in indices})
        self._fmodel = fmodel
        self._grad_callback = grad_callback
        self._track_higher_grads = track_higher_grads
        self._first_order = first_order
        # Set by innerloop_ctx(truncate=..., checkpoint=...); read by unroll().
        self.unroll_policy: UnrollPolicy | None = None
        if override is not None:
            self._apply_override(override)

    @staticmethod
    def _copy_state_value(key: str, value: Any, device: torch.device | str | None) -> Any:
        if isinstance(value, Tensor):
            if key == "step" and value.numel() == 1:
                # A Python number keeps bias corrections such as 1 - beta**step in double
                # precision; torch.optim's float32 step tensor would not.
                step = value.item()
                return int(step) if float(step).is_integer() else step
            value = value.detach().clone()
            return value.to(device) if device is not None else value
        return copy.deepcopy(value)

    @property
    def track_higher_grads(self) -> bool:
        """Whether steps keep the graph needed for higher-order gradients."""
        return self._track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        self._track_higher_grads = bool(value)

    @property
    def first_order(self) -> bool:
        """Whether steps use first-order gradients (settable per step: truncated unrolls)."""
        return self._first_order

    @first_order.setter
    def first_order(self, value: bool) -> None:
        self._first_order = bool(value)

    def _apply_override(self, override: Override) -> None:
        n = len(self.param_groups)
        valid = sorted({k for group in self.param_groups for k in group} - {"params"})
        for key in override:
            if key not in valid:
                raise ValueError(
                    f"override key {key!r} is not a hyperparameter of {type(self).__name__}; "
                    f"valid keys: {', '.join(valid)}"
                )
        for key, value in override.items():
            values = value if _is_per_group(value) else [value]
            if len(values) == 1:
                values = values * n
            elif len(values) != n:
                raise ValueError(
                    f"override[{key!r}] has {len(values)} values but the optimizer has {n} "
                    "parameter groups: give one value for all groups or one per group"
                )
            for group, v in zip(self.param_groups, values, strict=True):
                group[key] = v

    def step(
        self,
        loss: Tensor,
        params: Iterable[Tensor] | None = None,
        override: Override | None = None,
        grad_callback: GradCallback | None = None,
        **kwargs: Any,
    ) -> list[Tensor]:
        """Take one differentiable step on ``loss`` and return the new fast weights.

        Args:
            loss: a scalar computed from the fast weights.
            params: the fast weights to step from (default: the fmodel's latest).
            override: hyperparameters for this step and after (see the class docs).
            grad_callback: replaces the constructor's callback for this step.
            **kwargs: passed on to ``_update``.

        Returns:
            The new fast weights, in the order of the reference parameters; also made the
            fmodel's latest fast weights when there is one.

        Raises:
            ValueError: no params to step, a params list of the wrong length, or a loss that
                does not depend on the fast weights.
            RuntimeError: the inner loop was opened with ``truncate`` or ``checkpoint``
                (use :meth:`unroll`).
        """
        policy = self.unroll_policy
        if policy is not None and (policy.truncate is not None or policy.checkpoint):
            what = "truncate=" + str(policy.truncate) if policy.truncate is not None else ""
            what = what or "checkpoint=True"
            raise RuntimeError(
                f"this inner loop was opened with {what}, which step() cannot apply (it needs "
                "the number of steps, and a checkpointed unroll needs the inner loss as a "
                "function to recompute it): run the loop with diffopt.unroll(loss_fn, steps), "
                "where loss_fn(params) computes the inner loss with fmodel(x, params=params)"
            )
        return self._step(loss, params, override, grad_callback, **kwargs)

    def unroll(
        self,
        loss_fn: Callable[[list[Tensor]], Tensor],
        steps: int,
        override: Override | Callable[[int], Override | None] | None = None,
    ) -> list[Tensor]:
        """Take ``steps`` steps on ``loss_fn`` under the inner loop's unroll policy.

        The policy comes from :func:`~metalight.innerloop_ctx`'s ``first_order``,
        ``truncate`` and ``checkpoint``: the meta-gradient flows through the last
        ``truncate`` steps only (earlier steps run first-order, the optimizer state carries
        across), and a checkpointed unroll recomputes each step's activations in the
        backward pass instead of storing them (built-in optimizers only). Without a policy
        this is ``steps`` calls of :meth:`step`.

        Args:
            loss_fn: the inner loss as a function of the fast weights, e.g.
                ``lambda params: F.mse_loss(fmodel(x, params=params), y)``. A checkpointed
                unroll calls it again in the backward pass: no side effects.
            steps: the number of inner steps (>= 0).
            override: hyperparameters for every step, or a function of the step index
                returning them (None: keep the current ones).

        Returns:
            The final fast weights (also the fmodel's latest).

        Raises:
            ValueError: no fmodel, or a bad ``steps``.

        Example:
            >>> import torch
            >>> import metalight
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
            >>> mse = torch.nn.functional.mse_loss
            >>> ctx = metalight.innerloop_ctx(
            ...     model, opt, copy_initial_weights=False, truncate=5, checkpoint=True
            ... )
            >>> with ctx as (fmodel, diffopt):
            ...     _ = diffopt.unroll(lambda params: mse(fmodel(x, params=params), y), 50)
            ...     mse(fmodel(x), y).backward()
            >>> model.weight.grad.shape
            torch.Size([1, 2])
        """
        from metalight.unroll import UnrollPolicy, run_unroll

        if self._fmodel is None:
            raise ValueError(
                "unroll() needs the functional model: open the loop with innerloop_ctx, or "
                "build the optimizer with fmodel=..."
            )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        policy = self.unroll_policy or UnrollPolicy()
        if self._first_order and not policy.first_order:
            policy = UnrollPolicy(
                first_order=True, truncate=policy.truncate, checkpoint=policy.checkpoint
            )
        per_step = override if callable(override) else (lambda _step: override)
        first_order = self._first_order
        try:
            run_unroll(
                self._fmodel,
                self,
                loss_fn,
                steps,
                policy,
                create_graph=self._track_higher_grads,
                override=per_step,
            )
        finally:
            self._first_order = first_order
        return list(self._fmodel.fast_params or [])

    def _step(
        self,
        loss: Tensor,
        params: Iterable[Tensor] | None = None,
        override: Override | None = None,
        grad_callback: GradCallback | None = None,
        **kwargs: Any,
    ) -> list[Tensor]:
        if override is not None:
            self._apply_override(override)
        if params is None:
            if self._fmodel is None or self._fmodel.fast_params is None:
                raise ValueError(
                    "step() needs the fast weights: pass params=[...] or build the optimizer "
                    "with fmodel=..."
                )
            params = self._fmodel.fast_params
        params = list(params)
        if len(params) != self._num_params:
            raise ValueError(
                f"step() got {len(params)} params but the optimizer was built over "
                f"{self._num_params} reference parameters"
            )
        grads = self._grads(loss, params)
        grads = self._call_grad_callback(
            grad_callback if grad_callback is not None else self._grad_callback, grads
        )
        grouped_grads = []
        for group, indices in zip(self.param_groups, self._group_to_param_list, strict=True):
            group_params = group["params"]
            for i, index in enumerate(indices):
                group_params[i] = params[index]
            grouped_grads.append([grads[index] for index in indices])
        track = self._track_higher_grads
        # In test mode no graph is wanted, so the update itself records none either.
        with contextlib.nullcontext() if track else torch.no_grad():
            self._update(grouped_grads, **kwargs)
        new_params = params[:]
        for group, indices in zip(self.param_groups, self._group_to_param_list, strict=True):
            for p, index in zip(group["params"], indices, strict=True):
                new_params[index] = (
                    p if track else p.detach().requires_grad_(params[index].requires_grad)
                )
        if self._fmodel is not None:
            self._fmodel.update_params(new_params)
        return new_params

    def _grads(
        self, loss: Tensor, params: list[Tensor], first_order: bool | None = None
    ) -> list[Tensor | None]:
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                "step() needs a scalar loss tensor; reduce it first, e.g. loss.mean() "
                f"(got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)})" if isinstance(loss, Tensor) else ")")
            )
        # Only parameters some group steps need a gradient (ANIL adapts the head alone).
        targets = [i for i in self._stepped if params[i].requires_grad]
        if not loss.requires_grad or not targets:
            raise ValueError(
                "the loss does not depend on the fast weights (it does not require grad): "
                "compute it from the functional model's output, e.g. loss_fn(fmodel(x), y), "
                "not from the original module or from detached tensors"
            )
        if first_order is None:
            first_order = self._first_order
        create_graph = self._track_higher_grads and not first_order
        found = torch.autograd.grad(
            loss, [params[i] for i in targets], create_graph=create_graph, allow_unused=True
        )
        if all(g is None for g in found):
            raise ValueError(
                "the loss does not depend on any fast weight: compute it from the functional "
                "model's output (fmodel(x)), not from the original module"
            )
        grads: list[Tensor | None] = [None] * len(params)
        for i, g in zip(targets, found, strict=True):
            grads[i] = g
        return grads

    @staticmethod
    def _call_grad_callback(
        callback: GradCallback | None, grads: list[Tensor | None]
    ) -> list[Tensor | None]:
        if callback is None:
            return grads
        new = list(callback(grads))
        if len(new) != len(grads):
            raise ValueError(
                f"grad_callback returned {len(new)} gradients, expected {len(grads)} (one per "
                "fast weight, in the order it was given them, None where it got None)"
            )
        return new

    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        """Write new fast weights into ``self.param_groups[g]['params'][i]``.

        Args:
            grouped_grads: per group, the gradient of each of its parameters (None where the
                loss does not depend on that parameter).
            **kwargs: whatever the caller passed to ``step``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement _update(grouped_grads, **kwargs)"
        )


class FunctionalCoreOptimizer(DifferentiableOptimizer):
    """A differentiable optimizer whose update is a pure :class:`FunctionalOptimizer`.

    Besides higher's stateful ``step``, it offers a side-effect-free step on explicit
    parameters and states (:meth:`pure_step`), which recomputing unroll policies need.
    """

    core: ClassVar[FunctionalOptimizer]
    _initialised: set[int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # ids of per-parameter state dicts already initialised (they live as long as self)
        self._initialised = set()
        super().__init__(*args, **kwargs)

    def hyperparameters(self) -> list[dict[str, Any]]:
        """The core's hyperparameters of each group, as they are now."""
        defaults = self.core.defaults
        return [{k: g[k] for k in defaults if k in g} for g in self.param_groups]

    def group_states(self, params: Sequence[Tensor]) -> list[Any]:
        """Each group's state as the core's NamedTuple (fresh entries initialised)."""
        core = self.core
        fields = core.state_type._fields
        states = []
        for state, indices, hyper in zip(
            self.state, self._group_to_param_list, self.hyperparameters(), strict=True
        ):
            entries = [state[i] for i in range(len(indices))]
            # An optimizer whose state stays empty (SGD without momentum) would otherwise be
            # initialised again at every step; the ids of entries done are remembered.
            fresh = [
                i
                for i, entry in enumerate(entries)
                if not entry and id(entry) not in self._initialised
            ]
            if fresh:
                new = core.init([params[indices[i]] for i in fresh], **hyper)
                for field, values in zip(fields, new, strict=True):
                    for i, v in zip(fresh, values, strict=True):
                        if v is not None:
                            entries[i][field] = v
                self._initialised.update(id(entries[i]) for i in fresh)
            states.append(core.state_type(*[[e.get(f) for e in entries] for f in fields]))
        return states

    def store_group_states(self, states: Sequence[Any]) -> None:
        """Write NamedTuple group states back into ``self.state``."""
        fields = self.core.state_type._fields
        for state, new_state in zip(self.state, states, strict=True):
            for field, values in zip(fields, new_state, strict=True):
                for i, v in enumerate(values):
                    if v is None:
                        state[i].pop(field, None)
                    else:
                        state[i][field] = v

    def update_groups(
        self,
        grads: Sequence[Tensor | None],
        params: Sequence[Tensor],
        states: Sequence[Any],
        hypers: Sequence[dict[str, Any]],
    ) -> tuple[list[Tensor], list[Any]]:
        """Pure update of all groups: new full parameter list and new group states."""
        new_params = list(params)
        new_states = []
        for indices, state, hyper in zip(self._group_to_param_list, states, hypers, strict=True):
            group_new, group_state = self.core.update(
                [grads[i] for i in indices], state, [params[i] for i in indices], **hyper
            )
            for i, p in zip(indices, group_new, strict=True):
                new_params[i] = p
            new_states.append(group_state)
        return new_params, new_states

    def pure_step(
        self,
        loss: Tensor,
        params: Sequence[Tensor],
        states: Sequence[Any],
        hypers: Sequence[dict[str, Any]],
        first_order: bool = False,
    ) -> tuple[list[Tensor], list[Any]]:
        """One step on explicit parameters and states, touching nothing else."""
        grads = self._grads(loss, list(params), first_order=first_order)
        grads = self._call_grad_callback(self._grad_callback, grads)
        return self.update_groups(grads, params, states, hypers)

    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        params: list[Tensor] = [None] * self._num_params  # type: ignore[list-item]
        grads: list[Tensor | None] = [None] * self._num_params
        for group, group_grads, indices in zip(
            self.param_groups, grouped_grads, self._group_to_param_list, strict=True
        ):
            for p, g, i in zip(group["params"], group_grads, indices, strict=True):
                params[i], grads[i] = p, g
        new_params, new_states = self.update_groups(
            grads, params, self.group_states(params), self.hyperparameters()
        )
        self.store_group_states(new_states)
        for group, indices in zip(self.param_groups, self._group_to_param_list, strict=True):
            group["params"][:] = [new_params[i] for i in indices]
