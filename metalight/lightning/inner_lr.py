"""Which parameters the inner loop adapts, and the learned inner learning rates.

``MetaLearningModule`` keeps the rates in its ``inner_lrs`` parameter list (so checkpoints
name them ``inner_lrs.0``, ``inner_lrs.1``, ...); this module builds that list and turns it
into each inner step's hyperparameter override.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from metalight.lightning.inner_lr import inner_override, make_inner_lrs, select_adapted
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    >>> trainable = [n for n, _ in model.named_parameters()]
    >>> adapted = select_adapted(["1"], trainable, model)
    >>> adapted
    ['1.weight', '1.bias']
    >>> rates = make_inner_lrs("per_layer_per_step", 0.1, adapted, dict(model.named_parameters()),
    ...                        steps=2)
    >>> [tuple(r.shape) for r in rates]
    [(2,), (2,)]
    >>> [lr.item() for lr in inner_override("per_layer_per_step", rates, 5)["lr"]]
    [0.10000000149011612, 0.10000000149011612]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "InnerLR",
    "base_lr",
    "inner_override",
    "make_inner_lrs",
    "resolve_adapted",
    "select_adapted",
]

InnerLR = Literal["scalar", "per_layer", "per_layer_per_step", "per_parameter"]


def select_adapted(
    patterns: str | Sequence[str] | None,
    trainable: list[str],
    model: nn.Module,
    argument: str = "adapted",
) -> list[str]:
    """The names in ``trainable`` that ``patterns`` select, in the model's order.

    Args:
        patterns: parameter names or name prefixes (``"head"`` selects ``head.weight``);
            None selects every trainable parameter.
        trainable: the names of the model's trainable parameters.
        model: the model, for the error message.
        argument: the argument name the patterns came from, for the error message.

    Raises:
        ValueError: a pattern matches no trainable parameter.
    """
    if patterns is None:
        return trainable
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen: list[str] = []
    for pattern in patterns:
        matches = [n for n in trainable if n == pattern or n.startswith(pattern + ".")]
        if not matches:
            raise ValueError(
                f"{argument}={pattern!r} matches no trainable parameter of "
                f"{type(model).__name__}; its parameters are: {', '.join(trainable)}"
            )
        chosen.extend(m for m in matches if m not in chosen)
    return [n for n in trainable if n in chosen]


def resolve_adapted(
    adapted: Sequence[str] | None, adapt: Sequence[str] | None
) -> tuple[Sequence[str] | None, str]:
    """The patterns of ``adapted=`` or of its former name ``adapt=``, and which was used.

    The same choice under both names is one choice (a subclass may pass one, its caller the
    other); two different ones are refused.
    """
    if adapt is None:
        return adapted, "adapted"
    if adapted is not None and _names(adapted) != _names(adapt):
        raise ValueError(
            f"adapted={_names(adapted)} and adapt={_names(adapt)} both given: adapt= is the "
            "former name of adapted=; pass adapted= only"
        )
    return adapt, "adapt"


def _names(value: Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The inner optimizer's learning rate, where learned rates start."""
    lr = optimizer.param_groups[0].get("lr")
    if lr is None:
        raise ValueError(
            f"learn_inner_lr needs an inner optimizer with an 'lr' hyperparameter; "
            f"{type(optimizer).__name__} has none"
        )
    return float(lr)


def make_inner_lrs(
    mode: InnerLR | None,
    lr: float | None,
    adapted: Sequence[str],
    params: dict[str, nn.Parameter],
    steps: int,
) -> nn.ParameterList:
    """The learnable inner learning rates of ``mode``, all starting at ``lr``.

    Args:
        mode: "scalar" (one), "per_layer" (one per adapted tensor), "per_layer_per_step"
            (one per adapted tensor and step), "per_parameter" (one per weight entry); None
            for none (an empty list).
        lr: the starting rate (read only when ``mode`` is not None).
        adapted: the names of the adapted parameters.
        params: the model's parameters by name.
        steps: the most inner steps a rate per step must cover.
    """
    lrs = nn.ParameterList()
    if mode is None:
        return lrs
    if mode not in ("scalar", "per_layer", "per_layer_per_step", "per_parameter"):
        raise ValueError(
            "learn_inner_lr must be None, 'scalar', 'per_layer', 'per_layer_per_step' or "
            f"'per_parameter', got {mode!r}"
        )
    assert lr is not None
    n = len(adapted)
    # The rates follow the adapted weights' dtype and device: a float64 model gets float64
    # rates (float32 ones would round every inner step of an exact float64 computation).
    first = params[adapted[0]]
    like: dict[str, Any] = {"dtype": first.dtype, "device": first.device}
    if mode == "scalar":
        lrs.append(nn.Parameter(torch.tensor(lr, **like)))
    elif mode == "per_layer":
        lrs.extend(nn.Parameter(torch.tensor(lr, **like)) for _ in range(n))
    elif mode == "per_layer_per_step":
        lrs.extend(nn.Parameter(torch.full((max(steps, 1),), lr, **like)) for _ in range(n))
    else:
        lrs.extend(nn.Parameter(torch.full_like(params[name].detach(), lr)) for name in adapted)
    return lrs


def inner_override(
    mode: InnerLR | None, inner_lrs: nn.ParameterList, step: int
) -> dict[str, list[Any]] | None:
    """The hyperparameters of inner step ``step`` under learned rates, or None without."""
    if mode is None:
        return None
    if mode == "scalar":
        return {"lr": [inner_lrs[0]]}
    if mode == "per_layer_per_step":
        last = inner_lrs[0].shape[0] - 1
        return {"lr": [lr[min(step, last)] for lr in inner_lrs]}
    return {"lr": list(inner_lrs)}
