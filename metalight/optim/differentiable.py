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
import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from metalight.optim.functional import FunctionalOptimizer
from metalight.optim.unroll import GradCallback, Override, StepOverride, UnrollPolicy, run_unroll

__all__ = ["DifferentiableOptimizer", "FunctionalCoreOptimizer", "GradCallback", "Override"]


def _is_per_group(value: Any) -> bool:
    return isinstance(value, list)


def _plain(value: Any) -> Any:
    """A detached copy of ``value`` (a number for a one-element hyperparameter tensor)."""
    if isinstance(value, Tensor):
        return value.detach().item() if value.numel() == 1 else value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    return copy.deepcopy(value)


def _plain_state(key: str, value: Any) -> Any:
    """One state entry as ``torch.optim`` keeps it: a step count is a float tensor."""
    if key == "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.get_default_dtype())
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_plain_state("", v) for v in value)
    return copy.deepcopy(value)


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
            self.apply_override(override)

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

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state and groups in ``torch.optim.Optimizer.state_dict``'s form.

        As in higher, the ``torch.optim`` optimizer this one was branched from (or any
        built over the same parameters in the same groups) accepts it:
        ``opt.load_state_dict(diffopt.state_dict())`` continues with the inner loop's state.
        Parameters are numbered in group order, as ``torch.optim`` numbers them. Tensors are
        detached copies (a ``torch.optim`` step updates its state in place, which must not
        reach the unroll's graph); a ``step`` count is a float tensor, as ``torch.optim``
        keeps it; a tensor hyperparameter (a learned learning rate) becomes a number.

        Returns:
            ``{"state": {index: {name: value}}, "param_groups": [{..., "params": [index]}]}``.

        Example:
            >>> import torch
            >>> import metalight
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = torch.optim.Adam(model.parameters(), lr=0.1)
            >>> with metalight.innerloop_ctx(model, opt) as (fmodel, diffopt):
            ...     _ = diffopt.step(fmodel(torch.randn(5, 3)).pow(2).mean())
            ...     opt.load_state_dict(diffopt.state_dict())
            >>> int(opt.state[model.weight]["step"])
            1
        """
        packed: dict[int, dict[str, Any]] = {}
        groups: list[dict[str, Any]] = []
        start = 0
        for group, state in zip(self.param_groups, self.state, strict=True):
            count = len(group["params"])
            hyper = {k: _plain(v) for k, v in group.items() if k != "params"}
            groups.append({**hyper, "params": list(range(start, start + count))})
            for p_idx in range(count):
                entry = state.get(p_idx)
                if entry:
                    packed[start + p_idx] = {k: _plain_state(k, v) for k, v in entry.items()}
            start += count
        return {"state": packed, "param_groups": groups}

    @property
    def track_higher_grads(self) -> bool:
        """Whether steps keep the graph needed for higher-order gradients (settable)."""
        return self._track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        self._track_higher_grads = bool(value)

    @property
    def first_order(self) -> bool:
        """The default of :meth:`inner_step`'s ``first_order`` (set at construction).

        The unroll loop passes ``first_order`` to each step instead of setting this.
        """
        return self._first_order

    @first_order.setter
    def first_order(self, value: bool) -> None:
        self._first_order = bool(value)

    @property
    def grad_callback(self) -> GradCallback | None:
        """The constructor's ``grad_callback`` (None: gradients are used as they are)."""
        return self._grad_callback

    @grad_callback.setter
    def grad_callback(self, value: GradCallback | None) -> None:
        self._grad_callback = value

    @property
    def supports_pure_step(self) -> bool:
        """Whether the update is a pure function of ``(params, states, hypers)``.

        False here: a custom optimizer updates in place through ``_update``. Built-in
        optimizers (:class:`FunctionalCoreOptimizer`) say True unless a subclass replaces
        their ``_update``.
        """
        return False

    def apply_override(self, override: Override) -> None:
        """Replace hyperparameters of the groups, for the next step and after.

        Args:
            override: ``{key: value}`` or ``{key: [value per group]}`` (one value for all
                groups or one per group); keys must be keys of the groups (``lr``, ...).

        Raises:
            ValueError: a key the groups do not have, or a wrong number of values.

        Example:
            >>> import torch
            >>> import metalight
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> diffopt = metalight.get_diff_optim(opt, model.parameters())
            >>> diffopt.apply_override({"lr": [0.5]})
            >>> diffopt.param_groups[0]["lr"]
            0.5
        """
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

    # Thin aliases of the public names for callers written before they existed.
    def _apply_override(self, override: Override) -> None:
        self.apply_override(override)

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
        return self.inner_step(loss, params, override, grad_callback, **kwargs)

    def unroll(
        self,
        loss_fn: Callable[[list[Tensor]], Tensor],
        steps: int,
        override: Override | StepOverride | None = None,
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

        def per_step(step: int) -> Override | None:
            return override(step) if callable(override) else override

        run_unroll(
            self._fmodel,
            self,
            loss_fn,
            steps,
            policy,
            create_graph=self._track_higher_grads,
            override=per_step,
        )
        return list(self._fmodel.fast_params or [])

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
        """One step as :meth:`step` takes it, without the unroll-policy check.

        The unroll loop's building block for optimizers without a pure step.

        Args:
            loss, params, override, grad_callback, **kwargs: as in :meth:`step`.
            first_order: gradients without a graph of their own for this step (None: the
                constructor's ``first_order``).

        Returns:
            The new fast weights (also the fmodel's latest when there is one).
        """
        if override is not None:
            self.apply_override(override)
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
        grads = self._grads(loss, params, first_order)
        grads = self._call_grad_callback(
            grad_callback if grad_callback is not None else self._grad_callback, grads
        )
        if self._track_higher_grads:
            new_params = self._stateful_update(grads, params, **kwargs)
        else:
            # In test mode no graph is wanted, so the update itself records none either.
            with torch.no_grad():
                new_params = self._stateful_update(grads, params, **kwargs)
            new_params = [
                p.detach().requires_grad_(old.requires_grad)
                for p, old in zip(new_params, params, strict=True)
            ]
        if self._fmodel is not None:
            self._fmodel.update_params(new_params)
        return new_params

    def _step(
        self,
        loss: Tensor,
        params: Iterable[Tensor] | None = None,
        override: Override | None = None,
        grad_callback: GradCallback | None = None,
        **kwargs: Any,
    ) -> list[Tensor]:
        return self.inner_step(loss, params, override, grad_callback, **kwargs)

    def _stateful_update(
        self, grads: list[Tensor | None], params: list[Tensor], **kwargs: Any
    ) -> list[Tensor]:
        """higher's protocol: fast weights into the groups, ``_update``, fast weights out."""
        grouped_grads = []
        for group, indices in zip(self.param_groups, self._group_to_param_list, strict=True):
            group_params = group["params"]
            for i, index in enumerate(indices):
                group_params[i] = params[index]
            grouped_grads.append([grads[index] for index in indices])
        self._update(grouped_grads, **kwargs)
        new_params = params[:]
        for group, indices in zip(self.param_groups, self._group_to_param_list, strict=True):
            for p, index in zip(group["params"], indices, strict=True):
                new_params[index] = p
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

    # The pure-step part of the unroll loop's protocol; only built-in optimizers have it.
    def _no_pure_step(self) -> TypeError:
        return TypeError(
            f"{type(self).__name__} updates in place through _update and has no pure step; "
            "only built-in optimizers (metalight.optim.FunctionalCoreOptimizer) have one"
        )

    def hyperparameters(self) -> list[dict[str, Any]]:
        """The hyperparameters of each group (built-in optimizers only)."""
        raise self._no_pure_step()

    def group_states(self, params: Sequence[Tensor]) -> list[Any]:
        """Each group's state for the pure step (built-in optimizers only)."""
        raise self._no_pure_step()

    def store_group_states(
        self, states: Sequence[Any], params: Sequence[Tensor] | None = None
    ) -> None:
        """Keep states of the pure step (built-in optimizers only)."""
        raise self._no_pure_step()

    def pure_step(
        self,
        loss: Tensor,
        params: Sequence[Tensor],
        states: Sequence[Any],
        hypers: Sequence[dict[str, Any]],
        first_order: bool = False,
    ) -> tuple[list[Tensor], list[Any]]:
        """One step on explicit parameters and states (built-in optimizers only)."""
        raise self._no_pure_step()


class FunctionalCoreOptimizer(DifferentiableOptimizer):
    """A differentiable optimizer whose update is a pure :class:`FunctionalOptimizer`.

    Besides higher's stateful ``step``, it offers a side-effect-free step on explicit
    parameters and states (:meth:`pure_step`): every path (``step``, ``unroll``, the
    checkpointed and the task-vectorised unrolls) goes through that one step. Between
    steps the state stays in the core's NamedTuples; higher's per-parameter dicts
    (``diffopt.state[g][i]``) are filled from them when read.

    Example:
        >>> import torch
        >>> import metalight
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adam(model.parameters(), lr=0.1)
        >>> fmodel = metalight.monkeypatch(model)
        >>> diffopt = metalight.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
        >>> params = fmodel.fast_params
        >>> states = diffopt.group_states(params)
        >>> loss = fmodel(torch.ones(1, 2), params=params).sum()
        >>> params, states = diffopt.pure_step(loss, params, states, diffopt.hyperparameters())
        >>> states[0].step
        [1, 1]
        >>> diffopt.state[0][0]["step"]  # the optimizer's own state did not move
        0
    """

    core: ClassVar[FunctionalOptimizer]
    _initialised: set[int]
    _core_states: list[Any] | None
    _state_dicts: list[collections.defaultdict[int, dict[str, Any]]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # ids of per-parameter state dicts already initialised (they live as long as self)
        self._initialised = set()
        # The states of the last step in the core's form, not yet written into the dicts.
        self._core_states = None
        super().__init__(*args, **kwargs)

    @property
    def state(self) -> list[collections.defaultdict[int, dict[str, Any]]]:
        """higher's per-group, per-parameter state dicts (``state[g][i]["exp_avg"]``)."""
        if self._core_states is not None:
            # Written once when read, not at every step; the dicts are authoritative after.
            self._write_dicts(self._core_states)
            self._core_states = None
        return self._state_dicts

    @state.setter
    def state(self, value: list[collections.defaultdict[int, dict[str, Any]]]) -> None:
        self._state_dicts = value
        self._core_states = None

    @property
    def supports_pure_step(self) -> bool:
        """True unless a subclass replaces ``_update`` (then it runs, statefully)."""
        return type(self)._update is FunctionalCoreOptimizer._update

    def hyperparameters(self) -> list[dict[str, Any]]:
        """The core's hyperparameters of each group, as they are now."""
        defaults = self.core.defaults
        return [{k: g[k] for k in defaults if k in g} for g in self.param_groups]

    def group_states(self, params: Sequence[Tensor]) -> list[Any]:
        """Each group's state as the core's NamedTuple (fresh entries initialised)."""
        if self._core_states is not None:
            return list(self._core_states)
        core = self.core
        fields = core.state_type._fields  # type: ignore[attr-defined]
        states = []
        for state, indices, hyper in zip(
            self._state_dicts, self._group_to_param_list, self.hyperparameters(), strict=True
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

    def store_group_states(
        self, states: Sequence[Any], params: Sequence[Tensor] | None = None
    ) -> None:
        """Keep ``states`` as the optimizer's state (and ``params`` as the groups' weights).

        Kept in the core's form: the next step reads them as they are, and higher's
        per-parameter dicts are filled from them only when :attr:`state` is read.
        """
        self._core_states = list(states)
        if params is not None:
            for group, indices in zip(self.param_groups, self._group_to_param_list, strict=True):
                group["params"][:] = [params[i] for i in indices]

    def _write_dicts(self, states: Sequence[Any]) -> None:
        fields = self.core.state_type._fields  # type: ignore[attr-defined]
        for state, new_state in zip(self._state_dicts, states, strict=True):
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
        """One step on explicit parameters and states, touching nothing else.

        The gradients of ``loss`` (through the constructor's ``grad_callback``) feed the
        core's update of every group. With ``track_higher_grads=False`` the new weights
        carry no graph.

        Returns:
            ``(new_params, new_states)``.
        """
        params = list(params)
        grads = self._grads(loss, params, first_order=first_order)
        grads = self._call_grad_callback(self._grad_callback, grads)
        if self._track_higher_grads:
            return self.update_groups(grads, params, states, hypers)
        with torch.no_grad():
            new_params, new_states = self.update_groups(grads, params, states, hypers)
        return [
            p.detach().requires_grad_(old.requires_grad)
            for p, old in zip(new_params, params, strict=True)
        ], new_states

    def _stateful_update(
        self, grads: list[Tensor | None], params: list[Tensor], **kwargs: Any
    ) -> list[Tensor]:
        if not self.supports_pure_step or kwargs:
            return super()._stateful_update(grads, params, **kwargs)
        new_params, new_states = self.update_groups(
            grads, params, self.group_states(params), self.hyperparameters()
        )
        self.store_group_states(new_states, new_params)
        return new_params

    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        # higher's protocol, for subclasses that extend it with super()._update(...).
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
        self.store_group_states(new_states, new_params)
