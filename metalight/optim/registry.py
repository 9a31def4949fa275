"""Finding and building the differentiable twin of a ``torch.optim`` optimizer."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from metalight.optim.builtin import BUILTIN
from metalight.optim.differentiable import DifferentiableOptimizer, Override

__all__ = [
    "apply_trainable_opt_params",
    "create_diff_optim",
    "differentiable_class",
    "get_diff_optim",
    "get_trainable_opt_params",
    "register_optim",
    "registered_optimizers",
]

_REGISTRY: dict[type[torch.optim.Optimizer], type[DifferentiableOptimizer]] = dict(BUILTIN)

# Keys of torch.optim groups that are switches or bookkeeping, never learnable.
_NOT_LEARNABLE = frozenset(
    {
        "params",
        "initial_lr",
        "foreach",
        "fused",
        "capturable",
        "differentiable",
        "maximize",
        "amsgrad",
        "nesterov",
        "centered",
        "decoupled_weight_decay",
        "name",
    }
)


def register_optim(
    optim_type: type[torch.optim.Optimizer], diff_optim_type: type[DifferentiableOptimizer]
) -> None:
    """Make ``diff_optim_type`` the differentiable version of ``optim_type``.

    Args:
        optim_type: a ``torch.optim.Optimizer`` subclass.
        diff_optim_type: a :class:`DifferentiableOptimizer` subclass implementing
            ``_update(grouped_grads, **kwargs)``.

    Example:
        >>> import torch
        >>> import metalight
        >>> class MySGD(torch.optim.SGD): ...
        >>> class MyDiffSGD(metalight.optim.DifferentiableOptimizer):
        ...     def _update(self, grouped_grads, **kwargs):
        ...         for group, grads in zip(self.param_groups, grouped_grads):
        ...             for i, (p, g) in enumerate(zip(group["params"], grads)):
        ...                 if g is not None:
        ...                     group["params"][i] = p - group["lr"] * g
        >>> metalight.register_optim(MySGD, MyDiffSGD)
    """
    if not (isinstance(optim_type, type) and issubclass(optim_type, torch.optim.Optimizer)):
        raise TypeError(f"register_optim: {optim_type!r} is not a torch.optim.Optimizer subclass")
    if not (
        isinstance(diff_optim_type, type) and issubclass(diff_optim_type, DifferentiableOptimizer)
    ):
        raise TypeError(
            f"register_optim: {diff_optim_type!r} is not a metalight.optim."
            "DifferentiableOptimizer subclass"
        )
    _REGISTRY[optim_type] = diff_optim_type


def registered_optimizers() -> dict[type[torch.optim.Optimizer], type[DifferentiableOptimizer]]:
    """A copy of the map from ``torch.optim`` classes to their differentiable versions."""
    return dict(_REGISTRY)


def differentiable_class(optim_type: type) -> type[DifferentiableOptimizer]:
    """The registered differentiable version of ``optim_type``.

    Raises:
        ValueError: if none is registered (the message says how to register one).

    Example:
        >>> import torch
        >>> from metalight.optim import differentiable_class
        >>> differentiable_class(torch.optim.Adam).__name__
        'DifferentiableAdam'
    """
    return _lookup(optim_type)


def _lookup(optim_type: type) -> type[DifferentiableOptimizer]:
    # Exact class first, so a registered subclass wins over its registered base.
    if optim_type in _REGISTRY:
        return _REGISTRY[optim_type]
    step = getattr(optim_type, "step", None)
    for base in optim_type.__mro__[1:]:
        if base in _REGISTRY and getattr(base, "step", None) is step:
            return _REGISTRY[base]
    known = ", ".join(sorted(t.__name__ for t in _REGISTRY))
    raise ValueError(
        f"no differentiable version of {optim_type.__name__} is registered (known: {known}). "
        f"Write one by subclassing metalight.optim.DifferentiableOptimizer and implementing "
        f"_update(grouped_grads, **kwargs), then call "
        f"metalight.register_optim({optim_type.__name__}, YourDifferentiableOptimizer)"
    )


def get_diff_optim(
    opt: torch.optim.Optimizer,
    reference_params: Iterable[Tensor],
    fmodel: Any = None,
    device: torch.device | str | None = None,
    override: Override | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """Branch a differentiable optimizer from ``opt`` (hyperparameters, groups and state).

    Args:
        opt: the ``torch.optim.Optimizer`` to branch from.
        reference_params: the parameters ``opt`` was built over, in fast-weight order.
        fmodel: the functional model whose fast weights ``step`` updates.
        device: where to copy the state.
        override: hyperparameters replacing ``opt``'s, possibly tensors requiring grad.
        track_higher_grads: False for a cheap test mode.
        **kwargs: passed to the differentiable optimizer (``grad_callback``,
            ``first_order``).

    Raises:
        ValueError: if ``type(opt)`` has no registered differentiable version.
    """
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(
            f"get_diff_optim expects a torch.optim.Optimizer instance, got {type(opt).__name__}"
        )
    cls = _lookup(type(opt))
    return cls(
        opt,
        reference_params,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def create_diff_optim(
    opt_type: type[torch.optim.Optimizer],
    opt_kwargs: Mapping[str, Any] | None = None,
    params: Iterable[Tensor] | None = None,
    fmodel: Any = None,
    device: torch.device | str | None = None,
    override: Override | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """Build a differentiable optimizer of ``opt_type`` directly, with no torch.optim instance.

    Args:
        opt_type: a registered ``torch.optim`` class, e.g. ``torch.optim.Adam``.
        opt_kwargs: its hyperparameters.
        params: the fast weights it will step (default: ``fmodel``'s). Only their number
            and shapes are used here.
        fmodel, device, override, track_higher_grads, **kwargs: as in :func:`get_diff_optim`.

    Example:
        >>> import torch
        >>> import metalight
        >>> fmodel = metalight.monkeypatch(torch.nn.Linear(2, 1))
        >>> diffopt = metalight.create_diff_optim(torch.optim.Adam, {"lr": 0.1}, fmodel=fmodel)
    """
    if params is None:
        if fmodel is None or fmodel.fast_params is None:
            raise ValueError("create_diff_optim needs params=[...] or an fmodel with fast weights")
        params = fmodel.fast_params
    # The torch.optim instance only carries hyperparameters; it never steps these stand-ins.
    stand_ins = [torch.empty_like(p, device="meta").requires_grad_() for p in params]
    _lookup(opt_type)
    opt = opt_type(stand_ins, **dict(opt_kwargs or {}))
    return get_diff_optim(
        opt,
        stand_ins,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def _to_tensor(value: Any, like: Tensor | None, device: torch.device | str | None) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, numbers.Real):
        if like is None:
            return torch.tensor(float(value), device=device, requires_grad=True)
        # The hyperparameter follows its parameters: a float32 learning rate would turn a
        # float64 unroll's updates (and their meta-gradients) into float32 arithmetic.
        dtype = like.real.dtype if like.is_complex() else like.dtype
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        where = like.device if device is None else device
        return torch.tensor(float(value), dtype=dtype, device=where, requires_grad=True)
    if isinstance(value, tuple):
        return tuple(_to_tensor(v, like, device) for v in value)
    return value


def _first_tensor(group: Mapping[str, Any]) -> Tensor | None:
    # A differentiable optimizer's groups hold None until its first step.
    return next((p for p in group.get("params", []) if isinstance(p, Tensor)), None)


def get_trainable_opt_params(
    opt: torch.optim.Optimizer | DifferentiableOptimizer, device: torch.device | str | None = None
) -> dict[str, list[Any]]:
    """Numeric hyperparameters of every group as tensors that require grad.

    The result is an ``override`` for :func:`get_diff_optim` / ``innerloop_ctx``: learn
    inner learning rates (or momenta, betas) by putting these tensors in the outer optimizer.
    Each tensor takes the dtype and device of its group's parameters (a float64 model gets
    float64 hyperparameters); ``device`` overrides the device.

    Example:
        >>> import torch
        >>> import metalight
        >>> model = torch.nn.Linear(2, 1).double()
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> override = metalight.optim.get_trainable_opt_params(opt)
        >>> override["lr"][0].requires_grad, override["lr"][0].dtype
        (True, torch.float64)
    """
    override: dict[str, list[Any]] = {}
    for group in opt.param_groups:
        like = _first_tensor(group)
        for key, value in group.items():
            if key in _NOT_LEARNABLE:
                continue
            converted = _to_tensor(value, like, device)
            leaves = converted if isinstance(converted, tuple) else (converted,)
            if all(isinstance(v, Tensor) for v in leaves):
                override.setdefault(key, []).append(converted)
    n = len(opt.param_groups)
    return {k: v for k, v in override.items() if len(v) == n}


def _to_number(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().item() if value.numel() == 1 else value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_to_number(v) for v in value)
    return value


def _like(value: Any, old: Any) -> Any:
    """``value`` as a number of ``old``'s type (higher casts back: ``weight_decay=0`` stays 0)."""
    if isinstance(value, tuple) and isinstance(old, tuple) and len(value) == len(old):
        return type(old)(_like(v, o) for v, o in zip(value, old, strict=True))
    number = _to_number(value)
    # bool first: it is an int, and True must not become 1.
    for kind in (bool, int, float):
        if type(old) is kind and isinstance(number, (bool, int, float)):
            return kind(number)
    return number


def apply_trainable_opt_params(opt: torch.optim.Optimizer, override: Override) -> None:
    """Write (learned) hyperparameters back into a ``torch.optim`` optimizer's groups.

    Example:
        >>> import torch
        >>> import metalight
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> metalight.optim.apply_trainable_opt_params(opt, {"lr": [torch.tensor(0.5)]})
        >>> opt.param_groups[0]["lr"]
        0.5
    """
    n = len(opt.param_groups)
    for key, value in override.items():
        values = list(value) if isinstance(value, list) else [value]
        if len(values) == 1:
            values = values * n
        if len(values) != n:
            raise ValueError(f"override[{key!r}] has {len(values)} values for {n} parameter groups")
        for group, v in zip(opt.param_groups, values, strict=True):
            group[key] = _like(v, group[key]) if key in group else _to_number(v)
