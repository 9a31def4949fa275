"""iMAML: implicit meta-gradients by conjugate gradient on the proximal inner problem."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from metalight.data.task import Task
from metalight.functional import make_functional, monkeypatch
from metalight.lightning.module import MetaLearningModule
from metalight.optim.registry import get_diff_optim

__all__ = ["IMAML", "conjugate_gradient"]


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor], b: Tensor, steps: int, tol: float = 1e-12
) -> Tensor:
    """Solve ``A x = b`` for symmetric positive definite ``A`` given as ``matvec``.

    Stops early on a direction of non-positive curvature (``A`` not positive definite).

    Example:
        >>> import torch
        >>> from metalight.algorithms.imaml import conjugate_gradient
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> x = conjugate_gradient(lambda v: A @ v, b, steps=2)
        >>> torch.allclose(A @ x, b)
        True
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = r @ r
    for i in range(steps):
        if rs.sqrt() <= tol:
            break
        ap = matvec(p)
        curvature = p @ ap
        if curvature <= 0:
            # A non-convex inner loss can make A indefinite; CG's updates then point uphill.
            # Stop as truncated-Newton methods do (on the first iteration: plain b).
            return b.clone() if i == 0 else x
        alpha = rs / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = r @ r
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


class IMAML(MetaLearningModule):
    """Implicit MAML (Rajeswaran et al., 2019).

    Each task solves the proximal problem ``min_phi L_support(phi) + lam/2 ||phi - theta||^2``
    approximately with ``inner_steps`` steps that keep no graph; the meta-gradient
    ``(I + H / lam)^-1 grad L_query(phi)`` (``H`` the support-loss Hessian at ``phi``) comes
    from conjugate gradient on Hessian-vector products. Memory does not grow with the
    number of inner steps.

    Args:
        model: the network.
        reg_lambda: ``lam``, the strength of the proximal term.
        cg_steps: conjugate-gradient iterations.
        **kwargs: as for :class:`~metalight.lightning.MetaLearningModule`.

    Example:
        >>> from metalight.algorithms import IMAML
        >>> from metalight.models import MLP
        >>> imaml = IMAML(MLP(), reg_lambda=2.0, cg_steps=5, inner_steps=10)
    """

    def __init__(
        self, model: nn.Module, reg_lambda: float = 1.0, cg_steps: int = 5, **kwargs: Any
    ) -> None:
        if reg_lambda <= 0:
            raise ValueError(f"reg_lambda must be > 0, got {reg_lambda}")
        if cg_steps < 1:
            raise ValueError(f"cg_steps must be >= 1, got {cg_steps}")
        if kwargs.get("learn_inner_lr") is not None:
            raise ValueError("iMAML's implicit gradient does not reach inner learning rates")
        super().__init__(model, **kwargs)
        self.reg_lambda = reg_lambda
        self.cg_steps = cg_steps

    def adapt_proximal(self, task: Task) -> list[Tensor]:
        """Approximately solve the proximal inner problem; returns all fast weights."""
        anchors = [p.detach() for p in self.model.parameters()]
        fmodel = monkeypatch(self.model, detach_initial_weights=True, track_higher_grads=False)
        diffopt = get_diff_optim(
            self.inner_optimizer, self.model.parameters(), fmodel=fmodel, track_higher_grads=False
        )
        lam = self.reg_lambda

        def proximal_loss(params: list[Tensor]) -> Tensor:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
            loss = self.inner_loss(fmodel.call(params, task.support_x), task.support_y, task)
            return loss + 0.5 * lam * prox

        names = [n for n, _ in self.model.named_parameters()]
        self.unroll(fmodel, diffopt, proximal_loss, self.inner_steps, False, names=names)
        return [p.detach().requires_grad_() for p in fmodel.fast_params or []]

    def task_meta_gradient(
        self, task: Task, meta_params: list[nn.Parameter], scale: float
    ) -> tuple[Tensor, list[Tensor | None]]:
        phi = self.adapt_proximal(task)
        names = [n for n, _ in self.model.named_parameters()]
        adapted = [i for i, n in enumerate(names) if n in set(self.adaptable_parameters())]
        targets = [phi[i] for i in adapted]

        # A view with its own buffer copies, so BatchNorm statistics never leak into the model.
        forward = make_functional(self.model)
        forward.update_params(phi)

        query_output = forward(task.query_x)
        query_loss = self.outer_loss(query_output, task.query_y, task)
        self.note_query_output(query_output, task)
        query_grads = torch.autograd.grad(query_loss, targets, allow_unused=True)
        b = torch.cat(
            [
                (g if g is not None else torch.zeros_like(t)).reshape(-1)
                for g, t in zip(query_grads, targets, strict=True)
            ]
        )
        support_loss = self.inner_loss(forward(task.support_x), task.support_y, task)
        # A weight unused by the loss has no gradient (None): its Hessian rows are zero.
        support_grads = torch.autograd.grad(
            support_loss, targets, create_graph=True, allow_unused=True
        )
        connected = [g is not None for g in support_grads]
        if not any(connected):
            return query_loss.detach(), [None] * len(meta_params)
        flat_grads = torch.cat(
            [
                (g if g is not None else torch.zeros_like(t)).reshape(-1)
                for g, t in zip(support_grads, targets, strict=True)
            ]
        )

        def matvec(v: Tensor) -> Tensor:
            hv = torch.autograd.grad(
                flat_grads, targets, grad_outputs=v, retain_graph=True, allow_unused=True
            )
            flat_hv = torch.cat(
                [
                    (h if h is not None else torch.zeros_like(t)).reshape(-1)
                    for h, t in zip(hv, targets, strict=True)
                ]
            )
            return v + flat_hv / self.reg_lambda

        solution = conjugate_gradient(matvec, b.detach(), self.cg_steps) * scale
        per_param: dict[int, Tensor] = {}
        offset = 0
        for i, t, q, sg in zip(adapted, targets, query_grads, support_grads, strict=True):
            # Used by neither loss: no meta-gradient (None, as plain torch would leave it).
            if q is not None or sg is not None:
                per_param[i] = solution[offset : offset + t.numel()].view_as(t)
            offset += t.numel()
        index = {id(p): i for i, p in enumerate(self.model.parameters())}
        grads = [per_param.get(index.get(id(p), -1)) for p in meta_params]
        return query_loss.detach(), grads
