"""The arguments of ``MetaLearningModule.adapt``: a user's support set, checked, as a task.

``adapt(support_x, support_y, steps)`` takes tensors as a user has them: inputs in another
dtype or on another device, int32 labels. They are cast to the model's dtype and device, and
what cannot be right (one target per input missing, an empty set, class names, labels
outside the model's outputs) is refused in one line that says how to call it instead.

Example:
    >>> import torch
    >>> from metalight.lightning.support import adapt_arguments
    >>> from metalight.models import MLP
    >>> task, steps = adapt_arguments(
    ...     torch.randn(4, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0], dtype=torch.int32),
    ...     None, model=MLP(2, (8,), 3), default_steps=5,
    ...     is_classification=lambda y: not y.is_floating_point())
    >>> task.support_x.dtype, task.support_y.dtype, len(task.query_x), steps
    (torch.float32, torch.int64, 0, 5)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from metalight.data.task import Task

__all__ = ["adapt_arguments", "model_tensor"]


def adapt_arguments(
    support_x: Tensor | Task,
    support_y: Tensor | int | None,
    steps: int | None,
    *,
    model: nn.Module,
    default_steps: int,
    is_classification: Callable[[Tensor], bool],
) -> tuple[Task, int]:
    """The task and step count that ``adapt(support_x, support_y, steps)`` asks for.

    Args:
        support_x: the support inputs, or a whole :class:`Task`.
        support_y: the support targets; with a ``Task``, optionally the step count.
        steps: inner steps (None: ``default_steps``).
        model: the model; the inputs take its dtype and device, labels its output width.
        default_steps: the step count when none is given.
        is_classification: whether a target tensor holds class labels.

    Raises:
        TypeError, ValueError: one line saying what was wrong and how to call it instead.
    """
    if isinstance(support_x, Task):
        task = support_x
        if isinstance(support_y, int) and not isinstance(support_y, bool):
            if steps is not None:
                raise TypeError(f"adapt(task, {support_y}, {steps}): steps given twice")
            steps = support_y
        elif support_y is not None:
            raise TypeError(
                "adapt(task, ...) reads the support set from the task: call adapt(task, "
                "steps) or adapt(support_x, support_y, steps)"
            )
    elif isinstance(support_x, Tensor) and isinstance(support_y, Tensor):
        if support_x.shape[:1] != support_y.shape[:1]:
            raise ValueError(
                f"adapt(support_x, support_y): {support_x.shape[0]} inputs but "
                f"{support_y.shape[0]} targets; pass one target per support input"
            )
        if not support_x.shape[0]:
            raise ValueError(
                "adapt(support_x, support_y): the support set is empty; pass at least one "
                "example (a support set holds one or more per class)"
            )
        support_x, support_y = _support_tensors(support_x, support_y, model, is_classification)
        # The query fields are empty: adaptation reads the support set only.
        task = Task(support_x, support_y, support_x[:0], support_y[:0], support_y.new_zeros(0))
    elif isinstance(support_y, Sequence) and any(isinstance(v, str) for v in support_y):
        raise TypeError(
            "adapt(support_x, support_y): support_y holds class names; pass labels "
            "0..N-1 instead, e.g. names = sorted(set(y)); "
            "torch.tensor([names.index(c) for c in y])"
        )
    else:
        raise TypeError(
            "adapt() takes (support_x, support_y, steps) tensors or a Task, got "
            f"({type(support_x).__name__}, {type(support_y).__name__})"
        )
    steps = default_steps if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"adapt(): steps must be an integer >= 0, got {steps!r}")
    return task, steps


def model_tensor(model: nn.Module) -> Tensor | None:
    """A floating-point weight of ``model``: its dtype and device are the inputs'."""
    return next((p for p in model.parameters() if p.is_floating_point()), None)


def _support_tensors(
    x: Tensor, y: Tensor, model: nn.Module, is_classification: Callable[[Tensor], bool]
) -> tuple[Tensor, Tensor]:
    """A user's support set on the model's device and dtype, its labels checked."""
    like = model_tensor(model)
    if like is not None:
        x = x.to(like.device, like.dtype if x.is_floating_point() else x.dtype)
        y = y.to(like.device)
    if not is_classification(y):
        return x, y.to(like.dtype) if like is not None and y.is_floating_point() else y
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1:
        raise ValueError(
            f"adapt(support_x, support_y): class labels must be one integer per input "
            f"(shape [n]), got {y.dtype} of shape {list(y.shape)}"
        )
    y = y.long()  # cross-entropy takes int64 labels; int32 ones come from numpy often
    # A look at the output width must not move BatchNorm's running statistics; each
    # submodule gets its own mode back (a user may keep some in eval mode).
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(x).shape[-1]
    finally:
        for m, mode in modes:
            m.training = mode
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= outputs):
        found = sorted(set(y.tolist()))
        shown = ", ".join(map(str, found[:8])) + (", ..." if len(found) > 8 else "")
        raise ValueError(
            f"adapt(support_x, support_y): labels must be 0..{outputs - 1} (the model has "
            f"{outputs} outputs), got {shown}; number the classes 0..N-1, e.g. "
            "torch.unique(y, return_inverse=True)[1]"
        )
    return x, y
