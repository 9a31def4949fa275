"""ANIL: adapt only the head; the body runs once per task."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metalight.data.task import Task
from metalight.functional import functional_call, monkeypatch
from metalight.lightning.module import Adaptation, MetaLearningModule, StepCallback
from metalight.optim.registry import get_diff_optim

__all__ = ["ANIL"]


class ANIL(MetaLearningModule):
    """Almost No Inner Loop (Raghu et al., 2020).

    The body (``features``) is meta-learned but not adapted, so it runs once per task on the
    support and query sets; only the head is unrolled. With ``vectorize_tasks="auto"`` a
    model without convolutions trains with the task-vectorised step instead (all tasks'
    heads adapted at once, the body rerun per inner step: same meta-gradient, far fewer
    kernel launches).

    Args:
        model: a network with a body submodule and a head submodule, applied as
            ``head(body(x))`` (every backbone of :mod:`metalight.models` is).
        body: name of the body submodule.
        head: name of the head submodule (the adapted parameters).
        **kwargs: as for :class:`~metalight.lightning.MetaLearningModule`.

    Example:
        >>> from metalight.algorithms import ANIL
        >>> from metalight.models import Conv4
        >>> anil = ANIL(Conv4(hidden=8), inner_steps=5)
    """

    # The task-vectorised step (metalight.vectorized) computes the same meta-gradient: it
    # adapts the head only (adapted=[head]) and runs head(body(x)) through functional_forward.
    vectorized_hooks = ("adapt_task",)

    def __init__(
        self, model: nn.Module, body: str = "features", head: str = "head", **kwargs: Any
    ) -> None:
        names = dict(model.named_children())
        for role, name in (("body", body), ("head", head)):
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"ANIL {role}={name!r} matches no submodule of {type(model).__name__} "
                    f"(its submodules: {', '.join(names) or 'none'})"
                ) from None
        for name in ("adapted", "adapt"):
            if kwargs.get(name) not in (None, [head]):
                raise ValueError(f"ANIL adapts its head only; do not pass {name}=")
        kwargs.pop("adapt", None)
        kwargs["adapted"] = [head]
        super().__init__(model, **kwargs)
        self.body_name = body
        self.head_name = head

    def adapt_task(
        self,
        task: Task,
        steps: int,
        *,
        create_graph: bool,
        on_step: StepCallback | None = None,
    ) -> Adaptation:
        body = self.model.get_submodule(self.body_name)
        head = self.model.get_submodule(self.head_name)
        with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
            support = body(task.support_x)
            # No query set when adapting for prediction (adapt(support_x, support_y)).
            query = body(task.query_x) if len(task.query_x) else None
        fhead = monkeypatch(head, detach_initial_weights=False, track_higher_grads=create_graph)
        diffopt = get_diff_optim(
            self.inner_optimizer, head.parameters(), fmodel=fhead, track_higher_grads=create_graph
        )
        names = [f"{self.head_name}.{n}" for n, _ in head.named_parameters()]

        def predict(x: Tensor) -> Tensor:
            # Query features were computed once; other inputs go through the body.
            features = query if query is not None and x is task.query_x else body(x)
            return fhead(features)

        self.unroll(
            fhead,
            diffopt,
            lambda params: self.inner_loss(fhead.call(params, support), task.support_y, task),
            steps,
            create_graph,
            names=names,
            after_step=None if on_step is None else lambda k: on_step(k, predict),
        )
        return Adaptation(predict, fhead.fast_params or [])

    def functional_forward(self, values: dict[str, Tensor], x: Tensor) -> Tensor:
        """``head(body(x))`` with ``values`` (names of the whole model) replacing tensors."""

        def part(prefix: str) -> dict[str, Tensor]:
            start = prefix + "."
            return {k[len(start) :]: v for k, v in values.items() if k.startswith(start)}

        body = self.model.get_submodule(self.body_name)
        head = self.model.get_submodule(self.head_name)
        features = functional_call(body, part(self.body_name), (x,))
        return functional_call(head, part(self.head_name), (features,))
