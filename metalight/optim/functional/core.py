"""Core of the pure functional optimizers.

A :class:`FunctionalOptimizer` bundles two pure functions: ``init`` builds the optimizer state for
a list of parameters and ``update`` maps ``(grads, state, params)`` to new parameters and a new
state without modifying any input in place. Because every operation is an ordinary differentiable
torch operation, the returned parameters are differentiable (to any order) with respect to the
initial parameters, the gradients, and every hyperparameter passed as a tensor. This is what lets
a meta-gradient flow through an unrolled inner loop.

States are ``NamedTuple`` instances whose field names are exactly the per-parameter state keys of
the corresponding ``torch.optim`` class; every field holds one entry per parameter (a tensor, a
Python number for ``step``, or ``None`` where ``torch.optim`` would hold no value yet).
:func:`state_from_torch` and :func:`state_to_dicts` convert between the two representations.

This module also holds the small number-or-tensor helpers the optimizer modules are written with:
hyperparameters may be Python numbers (then the arithmetic mirrors ``torch.optim``'s single-tensor
implementation, including double-precision scalar math) or tensors (then the differentiable
formulation is used).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

__all__ = [
    "FunctionalOptimizer",
    "InitFn",
    "UpdateFn",
    "add",
    "addcdiv",
    "addcmul",
    "apply_per_parameter",
    "filled_like",
    "freeze_defaults",
    "is_active",
    "lerp",
    "resolve_hparams",
    "safe_sqrt",
    "scalar_tensor",
    "state_from_torch",
    "state_to_dicts",
]

Hyperparameter = float | Tensor
"""A hyperparameter value: a Python number or a (possibly ``requires_grad``) tensor."""

Kernel = Callable[
    [Tensor, Tensor, dict[str, Any], Mapping[str, Any]], tuple[Tensor, dict[str, Any]]
]
"""Per-parameter step ``(param, grad, entries, hparams) -> (new_param, changed_entries)``."""


class InitFn(Protocol):
    """Signature of :attr:`FunctionalOptimizer.init`."""

    def __call__(self, params: Sequence[Tensor], **hparams: Any) -> Any:
        """Return the initial state (a ``state_type`` instance) for ``params``."""
        ...


class UpdateFn(Protocol):
    """Signature of :attr:`FunctionalOptimizer.update`."""

    def __call__(
        self,
        grads: Sequence[Tensor | None],
        state: Any,
        params: Sequence[Tensor],
        **hparams: Any,
    ) -> tuple[list[Tensor], Any]:
        """Return ``(new_params, new_state)``; inputs are never modified in place."""
        ...


class FunctionalOptimizer(NamedTuple):
    """A differentiable optimizer as a pair of pure functions.

    Attributes:
        name: Short name, e.g. ``"adam"``.
        init: ``init(params, **hparams) -> State`` builds the initial state.
        update: ``update(grads, state, params, **hparams) -> (new_params, new_state)`` performs
            one step. It never modifies its inputs in place; a parameter whose gradient is
            ``None`` is returned unchanged (the same tensor object) together with its unchanged
            state entries.
        defaults: Accepted hyperparameter names with ``torch.optim``'s default values
            (implementation switches such as ``foreach`` or ``fused`` are not included).
        state_type: The ``NamedTuple`` class of the state.

    Example:
        >>> import torch
        >>> from metalight.optim.functional import sgd
        >>> w = torch.tensor([1.0, 2.0])
        >>> state = sgd.init([w], momentum=0.9)
        >>> (w,), state = sgd.update([torch.ones(2)], state, [w], lr=0.5, momentum=0.9)
        >>> w
        tensor([0.5000, 1.5000])
    """

    name: str
    init: InitFn
    update: UpdateFn
    defaults: Mapping[str, Any]
    state_type: type

    def __repr__(self) -> str:
        """Short representation naming the optimizer and its state type."""
        return f"FunctionalOptimizer(name={self.name!r}, state_type={self.state_type.__name__})"


def freeze_defaults(**defaults: Any) -> Mapping[str, Any]:
    """Return a read-only mapping of default hyperparameters."""
    return MappingProxyType(dict(defaults))


def _squeeze_one_element(value: Any) -> Any:
    """Turn 1-element tensors into 0-d tensors (like ``torch.optim``); recurse into tuples."""
    if isinstance(value, Tensor):
        if value.dim() > 0 and value.numel() == 1:
            return value.reshape(())
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_squeeze_one_element(v) for v in value)
    return value


def resolve_hparams(
    name: str, hparams: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """Merge ``hparams`` over ``defaults`` and validate them.

    Args:
        name: Optimizer name, used in error messages.
        hparams: Hyperparameters given by the caller.
        defaults: The optimizer's accepted hyperparameters and their default values.

    Returns:
        A new dict with every key of ``defaults``. One-element tensors are reshaped to 0-d
        tensors (as ``torch.optim`` does); tuples such as ``betas`` become tuples.

    Raises:
        TypeError: On an unknown hyperparameter name, or when a boolean switch (a hyperparameter
            whose default is a ``bool``) is given as a tensor.
    """
    unknown = sorted(set(hparams) - set(defaults))
    if unknown:
        raise TypeError(
            f"{name}: unexpected hyperparameter(s) {unknown}; accepted: {sorted(defaults)}"
        )
    merged = dict(defaults)
    for key, value in hparams.items():
        if isinstance(defaults[key], bool):
            if isinstance(value, Tensor):
                raise TypeError(f"{name}: {key!r} is a switch and must be a Python bool")
            value = bool(value)
        merged[key] = _squeeze_one_element(value)
    return merged


def is_active(value: Any) -> bool:
    """Whether an optional term (weight decay, momentum, ...) is applied.

    A Python number is active when it is nonzero, exactly like ``torch.optim``'s ``!= 0`` tests.
    A tensor is always active, so that its (meta-)gradient is defined even at zero.
    """
    if isinstance(value, Tensor):
        return True
    return bool(value != 0)


def scalar_dtype(param: Tensor) -> torch.dtype:
    """Dtype for 0-d state scalars (ASGD's ``eta``/``mu``, NAdam's ``mu_product``).

    At least float32, float64 for float64 parameters (complex parameters use their real dtype).
    """
    dtype = param.real.dtype if param.is_complex() else param.dtype
    if not dtype.is_floating_point:
        return torch.get_default_dtype()
    return torch.promote_types(dtype, torch.float32)


def scalar_tensor(value: Hyperparameter, like: Tensor) -> Tensor:
    """A 0-d tensor holding ``value`` with dtype :func:`scalar_dtype` ``(like)`` on its device.

    Tensor values keep their autograd history (they are converted with ``Tensor.to``).
    """
    dtype = scalar_dtype(like)
    if isinstance(value, Tensor):
        return value.to(device=like.device, dtype=dtype)
    return torch.tensor(value, dtype=dtype, device=like.device)


def filled_like(param: Tensor, value: Hyperparameter) -> Tensor:
    """A tensor shaped like ``param`` filled with ``value``.

    For complex parameters both the real and the imaginary part are set to ``value`` (as
    ``torch.optim`` does for Adagrad's accumulator and Rprop's step sizes). Tensor values keep
    their autograd history.
    """
    if param.is_complex():
        return torch.view_as_complex(filled_like(torch.view_as_real(param), value).contiguous())
    if isinstance(value, Tensor):
        return torch.zeros_like(param) + value
    return torch.full_like(param, value)


def safe_sqrt(x: Tensor) -> Tensor:
    """Elementwise square root whose derivatives at exactly zero are zero.

    The forward value is identical to :func:`torch.sqrt` (including NaN for negative inputs), but
    where ``x == 0`` the first and all higher derivatives are 0 instead of ``inf``/NaN. Optimizers
    use it for the square root of second moments, which are exactly zero for parameter entries
    whose gradient has always been zero; there the plain square root would turn the meta-gradient
    into ``0 * inf = NaN``.

    Args:
        x: Input tensor.

    Returns:
        ``sqrt(x)`` with zero gradient at the zeros of ``x``.

    Example:
        >>> import torch
        >>> x = torch.tensor([0.0, 4.0], requires_grad=True)
        >>> y = safe_sqrt(x)
        >>> y.detach()
        tensor([0., 2.])
        >>> torch.autograd.grad(y.sum(), x)[0]
        tensor([0.0000, 0.2500])
    """
    is_zero = x == 0
    safe_x = torch.where(is_zero, torch.ones_like(x), x)
    return torch.where(is_zero, torch.zeros_like(x), torch.sqrt(safe_x))


def lerp(start: Tensor, end: Tensor, weight: Hyperparameter) -> Tensor:
    """``start + weight * (end - start)`` (``torch.lerp`` for a Python-number weight)."""
    if isinstance(weight, Tensor):
        return start + weight * (end - start)
    return torch.lerp(start, end, weight)


def add(x: Tensor, y: Tensor, alpha: Hyperparameter) -> Tensor:
    """``x + alpha * y`` (``torch.add(x, y, alpha=alpha)`` for a Python-number alpha)."""
    if isinstance(alpha, Tensor):
        return x + alpha * y
    return torch.add(x, y, alpha=alpha)


def addcmul(x: Tensor, t1: Tensor, t2: Tensor, value: Hyperparameter) -> Tensor:
    """``x + value * t1 * t2`` (``torch.addcmul`` for a Python-number value)."""
    if isinstance(value, Tensor):
        return x + value * t1 * t2
    return torch.addcmul(x, t1, t2, value=value)


def addcdiv(x: Tensor, t1: Tensor, t2: Tensor, value: Hyperparameter) -> Tensor:
    """``x + value * t1 / t2`` (``torch.addcdiv`` for a Python-number value)."""
    if isinstance(value, Tensor):
        return x + value * t1 / t2
    return torch.addcdiv(x, t1, t2, value=value)


def _columns(state: Any) -> dict[str, list[Any]]:
    if not hasattr(state, "_fields"):
        raise TypeError(f"expected an optimizer state NamedTuple, got {type(state).__name__}")
    return {field: list(getattr(state, field)) for field in state._fields}


def _as_complex(x: Tensor) -> Tensor:
    return torch.view_as_complex(x.contiguous())


def apply_per_parameter(
    kernel: Kernel,
    grads: Sequence[Tensor | None],
    state: Any,
    params: Sequence[Tensor],
    hparams: Mapping[str, Any],
) -> tuple[list[Tensor], Any]:
    """Run a per-parameter ``kernel`` over all parameters, purely.

    Parameters whose gradient is ``None`` are passed through unchanged (same tensor objects, same
    state entries, no step increment). Complex parameters are processed as real views
    (``torch.view_as_real``), like ``torch.optim`` does, and converted back afterwards.

    Args:
        kernel: ``kernel(param, grad, entries, hparams) -> (new_param, changed_entries)`` where
            ``entries`` maps every state field to this parameter's entry. It must not modify its
            inputs in place.
        grads: One gradient (or ``None``) per parameter.
        state: The state NamedTuple; every field has one entry per parameter.
        params: The parameters.
        hparams: Resolved hyperparameters (see :func:`resolve_hparams`).

    Returns:
        ``(new_params, new_state)``, with new lists throughout.

    Raises:
        ValueError: When ``grads``, ``params`` and the state fields differ in length.
    """
    params = list(params)
    grads = list(grads)
    columns = _columns(state)
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} gradients for {len(params)} parameters")
    for field, column in columns.items():
        if len(column) != len(params):
            raise ValueError(
                f"state field {field!r} has {len(column)} entries for {len(params)} parameters"
            )
    new_params: list[Tensor] = []
    for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
        if grad is None:
            new_params.append(param)
            continue
        entries = {field: column[i] for field, column in columns.items()}
        if param.is_complex():
            real_entries = {
                k: torch.view_as_real(v) if isinstance(v, Tensor) and v.is_complex() else v
                for k, v in entries.items()
            }
            real_param = torch.view_as_real(param)
            real_grad = torch.view_as_real(grad) if grad.is_complex() else grad
            new_real, changed = kernel(real_param, real_grad, real_entries, hparams)
            new_param = _as_complex(new_real)
            changed = {
                k: _as_complex(v)
                if isinstance(v, Tensor) and v.dim() > 0 and v.shape == real_param.shape
                else v
                for k, v in changed.items()
            }
        else:
            new_param, changed = kernel(param, grad, entries, hparams)
        new_params.append(new_param)
        for field, value in changed.items():
            columns[field][i] = value
    return new_params, type(state)(**columns)


def _step_to_number(value: Any) -> int | float:
    number = float(value.item()) if isinstance(value, Tensor) else float(value)
    return int(number) if math.isfinite(number) and number.is_integer() else number


def state_from_torch(
    opt: FunctionalOptimizer,
    per_param_states: Sequence[Mapping[str, Any]],
    params: Sequence[Tensor],
    **hparams: Any,
) -> Any:
    """Build a functional state from ``torch.optim`` per-parameter state dicts.

    Args:
        opt: The functional optimizer the state is for.
        per_param_states: One dict per parameter, as found in ``torch_optimizer.state[p]``.
        params: The parameters (used to build ``opt.init`` values for missing entries).
        **hparams: Hyperparameters for ``opt.init`` (e.g. Adagrad's
            ``initial_accumulator_value`` or Rprop's ``lr``).

    Returns:
        An ``opt.state_type`` instance. Empty dicts (and keys a dict lacks) get ``opt.init``
        values; tensor ``step`` values become Python ints (floats if not integral); other
        tensors are copied with ``.clone()`` so the ``torch.optim`` state is never aliased.

    Raises:
        ValueError: On a length mismatch or a key that is not a field of ``opt.state_type``.

    Example:
        >>> import torch
        >>> from metalight.optim.functional import adam
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> torch_opt = torch.optim.Adam([w], lr=0.1)
        >>> w.grad = torch.ones(2)
        >>> torch_opt.step()
        >>> state = state_from_torch(adam, [torch_opt.state[w]], [w.detach()], lr=0.1)
        >>> state.step
        [1]
    """
    params = list(params)
    if len(per_param_states) != len(params):
        raise ValueError(f"got {len(per_param_states)} state dicts for {len(params)} parameters")
    fields = opt.state_type._fields  # type: ignore[attr-defined]
    fresh = opt.init(params, **hparams)
    columns: dict[str, list[Any]] = {field: [] for field in fields}
    for i, entries in enumerate(per_param_states):
        unknown = sorted(set(entries) - set(fields))
        if unknown:
            raise ValueError(f"{opt.name}: unexpected state key(s) {unknown} for parameter {i}")
        for field in fields:
            if field not in entries:
                columns[field].append(getattr(fresh, field)[i])
                continue
            value = entries[field]
            if field == "step":
                value = _step_to_number(value)
            elif isinstance(value, Tensor):
                value = value.clone()
            columns[field].append(value)
    return opt.state_type(**columns)


def state_to_dicts(state: Any) -> list[dict[str, Any]]:
    """Convert a functional state to one ``torch.optim``-style dict per parameter.

    Args:
        state: A state NamedTuple.

    Returns:
        A list with one dict per parameter mapping state keys to entries; ``None`` entries are
        omitted. The entries are not copied.
    """
    columns = _columns(state)
    sizes = {len(column) for column in columns.values()}
    if len(sizes) > 1:
        raise ValueError(f"state fields have different lengths: {sorted(sizes)}")
    size = sizes.pop() if sizes else 0
    return [
        {field: column[i] for field, column in columns.items() if column[i] is not None}
        for i in range(size)
    ]
