"""The checkpointed bilevel unroll recomputes each step as its forward pass ran it (float64).

Each test compares it with the plain unroll, which keeps every step's graph and so is the
reference: the weights a step leaves, the model's buffers, the train/eval modes and dropout
masks a step ran with, and what a finished meta-loss leaves alive.
"""

from __future__ import annotations

import copy
import functools
import gc
import weakref

import torch
from torch import Tensor, nn

from metalight.bilevel import HyperLR, InnerBatch, unroll
from metalight.optim.functional import sgd

K = 4  # inner steps


def _data(seed: int) -> tuple[list[InnerBatch], Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(K):
        x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
        batches.append(
            InnerBatch(x, torch.randint(0, 3, (6,), generator=generator), torch.arange(6))
        )
    val_x = torch.randn(8, 4, generator=generator, dtype=torch.float64)
    return batches, val_x, torch.randint(0, 3, (8,), generator=generator)


def _module(model: nn.Module, checkpoint: bool) -> HyperLR:
    module = HyperLR(
        copy.deepcopy(model),
        inner_optim=functools.partial(torch.optim.SGD, lr=0.2, momentum=0.9),
        inner_steps=K,
        checkpoint_unroll=checkpoint,
    ).double()
    with torch.no_grad():
        # Other rates per layer, so that every layer's term of the hypergradient differs.
        module.log_lr.add_(torch.linspace(-0.3, 0.3, module.log_lr.numel()).view_as(module.log_lr))
    return module


def _hypergradients(
    model: nn.Module, checkpoint: bool, seed: int, *, eval_outer: bool = False
) -> tuple[list[Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Hypergradients, and the model's buffers after the forward passes and after backward."""
    module = _module(model, checkpoint)
    batches, val_x, val_y = _data(seed)
    params, _, _ = module.unroll_inner(batches, *module.current_inner())
    if eval_outer:
        module.eval()  # the validation loss in eval mode; the inner steps ran in train mode
    outer = module.outer_loss(params, val_x, val_y)
    forward = {n: b.clone() for n, b in module.model.named_buffers()}
    outer.backward()
    after = {n: b.clone() for n, b in module.model.named_buffers()}
    grads = []
    for name, p in module.named_meta_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
        grads.append(p.grad)
    return grads, forward, after


def _stateful_model(seed: int) -> nn.Module:
    """Buffers that every forward pass in train mode moves: spectral norm's power-iteration
    vectors (they also change the output) and BatchNorm's running statistics."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.utils.parametrizations.spectral_norm(nn.Linear(4, 5)),
        nn.Tanh(),
        nn.Linear(5, 5),
        nn.BatchNorm1d(5),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).double()


def test_checkpointed_unroll_recomputes_on_the_buffers_each_step_saw() -> None:
    model = _stateful_model(0)
    want, want_forward, want_after = _hypergradients(model, False, 1)
    got, forward, after = _hypergradients(model, True, 1)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    # The plain unroll moved the buffers at every forward pass (K inner steps and the
    # validation loss); the recomputations moved none.
    assert want_forward["3.num_batches_tracked"].item() == K + 1
    for name in want_forward:
        assert torch.equal(forward[name], want_forward[name]), name
        assert torch.equal(after[name], forward[name]), f"{name} moved in backward"
        assert torch.equal(want_after[name], want_forward[name]), name


def test_a_retained_graph_recomputes_on_the_same_buffers_again() -> None:
    module = _module(_stateful_model(7), True)
    batches, val_x, val_y = _data(7)
    params, _, _ = module.unroll_inner(batches, *module.current_inner())
    outer = module.outer_loss(params, val_x, val_y)
    forward = {n: b.clone() for n, b in module.model.named_buffers()}
    outer.backward(retain_graph=True)
    first = [p.grad.clone() for _, p in module.named_meta_parameters()]
    outer.backward()
    for (_, p), g in zip(module.named_meta_parameters(), first, strict=True):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-12, atol=0)
    for name, b in module.model.named_buffers():
        assert torch.equal(b, forward[name]), f"{name} moved in backward"


def test_checkpointed_unroll_recomputes_in_the_modes_each_step_ran_in() -> None:
    model = _stateful_model(2)
    got, _, _ = _hypergradients(model, True, 3, eval_outer=True)
    want, _, _ = _hypergradients(model, False, 3, eval_outer=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_checkpointed_unroll_recomputes_with_the_dropout_masks_of_the_forward_pass() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).double()

    def run(checkpoint: bool) -> tuple[list[Tensor], Tensor]:
        torch.manual_seed(5)
        grads, _, _ = _hypergradients(model, checkpoint, 5)
        # The program's random stream goes on as if no step had been recomputed.
        return grads, torch.rand(3)

    (got, got_next), (want, want_next) = run(True), run(False)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert torch.equal(got_next, want_next)


def _engine_unroll(checkpoint: bool) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Two weights, the second held still by a zero learning rate (the bilevel way to freeze
    a weight: the engine trains every weight it is given)."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(10, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(10, generator=generator, dtype=torch.float64)
    w = [
        torch.randn(3, generator=generator, dtype=torch.float64),
        torch.zeros((), dtype=torch.float64),
    ]
    log_lr = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)

    # The loss closure reaches the unroll's own results (below), as a functional view's
    # history does: a cycle through autograd's graph.
    history: list[list[Tensor]] = []

    def loss(params: list[Tensor], meta: object, step: int) -> Tensor:
        assert len(history) <= 1  # the closure holds the history
        return ((x @ params[0] + params[1] - y) ** 2).mean()

    result = unroll(
        sgd,
        w,
        sgd.init(w, momentum=0.5),
        loss,
        lambda meta, step: [{"lr": meta[0].exp(), "momentum": 0.5}, {"lr": 0.0, "momentum": 0.5}],
        K,
        meta=[log_lr],
        checkpoint=checkpoint,
    )
    history.append(result.params)
    outer = ((x @ result.params[0] + result.params[1] - y) ** 2).sum()
    (grad,) = torch.autograd.grad(outer, log_lr)
    return w, result.params, grad


def test_checkpointed_unroll_updates_the_weights_as_the_plain_one() -> None:
    start, want, want_grad = _engine_unroll(False)
    _, got, got_grad = _engine_unroll(True)
    for a, b in zip(got, want, strict=True):
        assert a.requires_grad == b.requires_grad
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    assert torch.equal(got[1], start[1]), "a weight with learning rate 0 moved"
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-15)


def test_checkpointed_unroll_frees_its_results_after_backward() -> None:
    _, params, _ = _engine_unroll(True)
    weight = weakref.ref(params[0])
    del params
    gc.collect()
    # Each recomputed step's closure reaches the loss closure, whose history holds the
    # step's outputs: a cycle through autograd's graph that only backward can break.
    assert weight() is None, "the unroll's results outlived the meta-gradient"
