"""What the checkpointed unroll keeps: per inner step only its inputs (weights, optimizer
state, meta-parameters), counted exactly through autograd's saved-tensor hooks."""

from __future__ import annotations

import functools
import gc
import weakref

import torch
from torch import Tensor, nn

from metalight.bilevel import HyperLR, InnerBatch


class _Box:
    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


def _kept_bytes(checkpoint: bool, steps: int) -> int:
    """Bytes of the distinct storages the graph still holds after the forward pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 10))
    module = HyperLR(
        model,
        inner_optim=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        inner_steps=steps,
        checkpoint_unroll=checkpoint,
    )
    g = torch.Generator().manual_seed(0)
    batches = [
        InnerBatch(
            torch.randn(512, 16, generator=g),
            torch.randint(0, 10, (512,), generator=g),
            torch.arange(512),
        )
        for _ in range(steps)
    ]
    alive: weakref.WeakSet[_Box] = weakref.WeakSet()

    def pack(tensor: Tensor) -> _Box:
        box = _Box(tensor)
        alive.add(box)
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        params, _, _ = module.unroll_inner(batches, *module.current_inner())
        outer = module.outer_loss(params, batches[0].x, batches[0].y)
    # Graphs built and dropped inside a recomputed step's forward pass are gone by now.
    gc.collect()
    storages = {
        b.tensor.untyped_storage().data_ptr(): b.tensor.untyped_storage().nbytes() for b in alive
    }
    outer.backward()
    assert module.log_lr.grad is not None
    return sum(storages.values())


def test_checkpointed_unroll_keeps_only_each_steps_inputs() -> None:
    param_bytes = (16 * 64 + 64 + 64 * 10 + 10) * 4
    meta_bytes = (2 + 2) * 4  # per-layer log learning rates and log weight decays
    per_step = (_kept_bytes(True, 16) - _kept_bytes(True, 8)) / 8
    # Weights and momentum buffers in, per step, and the meta-parameters: nothing else.
    assert per_step == 2 * param_bytes + meta_bytes
    plain_per_step = (_kept_bytes(False, 16) - _kept_bytes(False, 8)) / 8
    assert plain_per_step > 20 * per_step  # the activations of a 512-example batch
