"""Independent references for the engine's differential tests (no metalight import here).

- :func:`torch_optim_trajectory`: ``torch.optim`` stepping a ``copy.deepcopy`` of the model,
  the fast weights every step should equal.
- :func:`reference_unroll`: the unroll written by hand over ``torch.func.functional_call``
  with the SGD and Adam update rules spelled out, differentiable, for meta-gradients.
- :class:`ModuleSnapshot`: everything about a user's module an unroll must not change.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from tests.engine.zoo import Run

__all__ = [
    "REFERENCE_OPTIMIZERS",
    "ModuleSnapshot",
    "reference_unroll",
    "torch_optim_trajectory",
]

#: The torch.optim classes whose update rule :func:`reference_unroll` writes out by hand.
REFERENCE_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _module_run(model: nn.Module) -> Run:
    return lambda path, x: model.get_submodule(path)(x)


def torch_optim_trajectory(
    model: nn.Module,
    call: Callable[[Run, Tensor], Tensor],
    opt_cls: type[torch.optim.Optimizer],
    opt_kwargs: dict[str, Any],
    data: tuple[Tensor, Tensor],
    steps: int,
) -> tuple[list[list[Tensor]], dict[str, Tensor]]:
    """Weights after each of ``steps`` ``torch.optim`` steps on a deep copy, and its buffers.

    Returns the distinct parameters in ``named_parameters()`` order after every step, and
    the copy's buffers by name at the end.
    """
    twin = copy.deepcopy(model)
    opt = opt_cls(twin.parameters(), **opt_kwargs)
    x, y = data
    trajectory = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(call(_module_run(twin), x), y).backward()
        opt.step()
        trajectory.append([p.detach().clone() for p in twin.parameters()])
    return trajectory, {n: b.detach().clone() for n, b in twin.named_buffers()}


def _safe_sqrt(x: Tensor) -> Tensor:
    # sqrt with a zero derivative where x == 0 (the engine's convention): d sqrt(x)/dx is
    # infinite at 0, and a zero second moment (a gradient entry that is exactly zero) would
    # otherwise turn the meta-gradient into NaN.
    zero = x == 0
    return torch.where(zero, torch.zeros_like(x), torch.where(zero, torch.ones_like(x), x).sqrt())


class _HandOptimizer:
    """SGD or Adam(W) written out from torch's documented update rules, out of place."""

    def __init__(self, opt_cls: type[torch.optim.Optimizer], opt_kwargs: dict[str, Any]) -> None:
        if opt_cls not in REFERENCE_OPTIMIZERS:
            raise ValueError(f"no hand-written reference for {opt_cls.__name__}")
        self.adam = opt_cls is not torch.optim.SGD
        self.h = opt_cls([torch.zeros(1)], **opt_kwargs).defaults
        self.state: dict[int, dict[str, Any]] = {}

    def update(self, i: int, p: Tensor, g: Tensor) -> Tensor:
        h, st = self.h, self.state.setdefault(i, {})
        if h["maximize"]:
            g = -g
        lr, wd = h["lr"], h["weight_decay"]
        if not self.adam:
            if wd:
                g = g + wd * p
            if h["momentum"]:
                buf = st.get("buf")
                # The first step's buffer is the gradient itself, without dampening.
                buf = g if buf is None else h["momentum"] * buf + (1 - h["dampening"]) * g
                st["buf"] = buf
                g = g + h["momentum"] * buf if h["nesterov"] else buf
            return p - lr * g
        b1, b2 = h["betas"]
        t = st["t"] = st.get("t", 0) + 1
        if wd:
            if h["decoupled_weight_decay"]:
                p = p * (1 - lr * wd)
            else:
                g = g + wd * p
        m = st["m"] = b1 * st.get("m", 0.0) + (1 - b1) * g
        v = st["v"] = b2 * st.get("v", 0.0) + (1 - b2) * g * g
        if h["amsgrad"]:
            v = st["vmax"] = torch.maximum(st["vmax"], v) if "vmax" in st else v
        denom = _safe_sqrt(v) / math.sqrt(1 - b2**t) + h["eps"]
        return p - lr / (1 - b1**t) * m / denom


def reference_unroll(
    model: nn.Module,
    call: Callable[[Run, Tensor], Tensor],
    opt_cls: type[torch.optim.Optimizer],
    opt_kwargs: dict[str, Any],
    support: tuple[Tensor, Tensor],
    query: tuple[Tensor, Tensor],
    steps: int,
    first_order_steps: int = 0,
) -> tuple[list[Tensor], list[Tensor | None]]:
    """The adapted weights and the meta-gradient, by hand.

    ``steps`` optimizer steps on the support MSE, the first ``first_order_steps`` of them
    with detached gradients (first order: ``steps``; truncated to the last T: ``steps - T``),
    then the meta-gradient of the query MSE w.r.t. the model's distinct parameters (None for
    frozen ones and ones the query loss does not reach).
    """
    # functional_call(..., tie_weights=False) on a deep copy, given a value for every name a
    # tensor is reachable under: nothing is left to the copy's own attributes (which the
    # call may leave swapped), and nothing of metalight is involved.
    twin = copy.deepcopy(model)
    named = list(twin.named_parameters(remove_duplicate=False))
    index: dict[int, int] = {}
    for _, p in named:
        index.setdefault(id(p), len(index))
    alias = [(n, index[id(p)]) for n, p in named]
    unique = list(twin.parameters())
    buffers_by_id: dict[int, Tensor] = {}
    buffers = {
        n: buffers_by_id.setdefault(id(b), b.detach().clone())
        for n, b in twin.named_buffers(remove_duplicate=False)
    }
    start = [p.detach().clone().requires_grad_(p.requires_grad) for p in unique]

    def run_with(params: Sequence[Tensor]) -> Run:
        def run(path: str, x: Tensor) -> Tensor:
            tensors = {n: params[i] for n, i in alias}
            tensors.update(buffers)
            if path:
                cut = len(path) + 1
                tensors = {k[cut:]: v for k, v in tensors.items() if k.startswith(path + ".")}
            return functional_call(twin.get_submodule(path), tensors, (x,), tie_weights=False)

        return run

    opt = _HandOptimizer(opt_cls, opt_kwargs)
    params = list(start)
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    for step in range(steps):
        loss = torch.nn.functional.mse_loss(call(run_with(params), support[0]), support[1])
        second_order = step >= first_order_steps
        grads = torch.autograd.grad(
            loss, [params[i] for i in trainable], create_graph=second_order, allow_unused=True
        )
        new = list(params)
        for i, g in zip(trainable, grads, strict=True):
            if g is not None:  # torch.optim skips a parameter without a gradient
                new[i] = opt.update(i, params[i], g if second_order else g.detach())
        params = new
    meta = torch.nn.functional.mse_loss(call(run_with(params), query[0]), query[1])
    found = iter(
        torch.autograd.grad(meta, [start[i] for i in trainable], allow_unused=True)
        if trainable
        else []
    )
    meta_grads: list[Tensor | None] = [next(found) if p.requires_grad else None for p in start]
    return [p.detach() for p in params], meta_grads


class ModuleSnapshot:
    """What a view, a step, an unroll, a context exit or an error must leave unchanged.

    The same Parameter and buffer objects under every name, bitwise the same values, leaf
    parameters without ``grad_fn`` and with the same ``requires_grad`` and ``.grad``, the
    same ``state_dict()``, train/eval modes, and RNN modules' cached weight lists holding
    the module's own parameters.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.params = [
            (n, p, p.detach().clone(), p.requires_grad, p.grad)
            for n, p in module.named_parameters(remove_duplicate=False)
        ]
        self.buffers = [
            (n, b, b.detach().clone()) for n, b in module.named_buffers(remove_duplicate=False)
        ]
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.modes = [(n, m.training) for n, m in module.named_modules(remove_duplicate=False)]

    def check(self, where: str) -> None:
        """Raise an AssertionError naming ``where`` and what changed."""
        module = self.module
        now = dict(module.named_parameters(remove_duplicate=False))
        assert list(now) == [n for n, *_ in self.params], f"{where}: parameter names changed"
        for name, p, value, requires_grad, grad in self.params:
            q = now[name]
            assert q is p, f"{where}: {name} is no longer the user's Parameter ({type(q)})"
            assert isinstance(q, nn.Parameter) and q.grad_fn is None, f"{where}: {name} grad_fn"
            assert q.requires_grad == requires_grad, f"{where}: {name} requires_grad changed"
            assert q.grad is grad, f"{where}: {name}.grad changed"
            assert torch.equal(q, value), f"{where}: {name} changed value"
        buffers = dict(module.named_buffers(remove_duplicate=False))
        assert list(buffers) == [n for n, *_ in self.buffers], f"{where}: buffer names changed"
        for name, b, value in self.buffers:
            assert buffers[name] is b, f"{where}: buffer {name} replaced"
            assert torch.equal(b, value), f"{where}: buffer {name} changed value"
        state = module.state_dict()
        assert list(state) == list(self.state), f"{where}: state_dict keys changed"
        for k, v in self.state.items():
            assert state[k].grad_fn is None, f"{where}: state_dict {k} has a grad_fn"
            assert torch.equal(state[k], v), f"{where}: state_dict {k} changed"
        modes = [(n, m.training) for n, m in module.named_modules(remove_duplicate=False)]
        assert modes == self.modes, f"{where}: train/eval modes changed"
        own = {id(p) for _, p, *_ in self.params}
        for name, sub in module.named_modules():
            if isinstance(sub, nn.RNNBase):
                held = [w for w in sub._flat_weights if w is not None]
                assert all(id(w) in own for w in held), (
                    f"{where}: RNN {name or 'root'} still holds fast weights in _flat_weights"
                )
