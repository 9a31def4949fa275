"""A meta-parameter the loss never uses ends an outer step with ``.grad`` None, as in torch.

``torch.optim`` skips parameters whose gradient is None; a zero gradient instead would let
AdamW's (or SGD's) weight decay shrink a parameter that nothing trains.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import lightning as L
import pytest
import torch
from torch import nn

from metalight.algorithms import ANIL, IMAML, MAML, MetaSGD
from metalight.lightning import MetaLearningModule
from tests.lightning.test_training import sinusoid


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(1, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)
        self.spare = nn.Parameter(torch.ones(3))  # never used by forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ADAMW = functools.partial(torch.optim.AdamW, lr=0.05, weight_decay=0.5)
SGD_DECAY = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=0.5)
INNER = functools.partial(torch.optim.SGD, lr=0.1)

CASES: dict[str, Callable[[], MetaLearningModule]] = {
    "maml-loop": lambda: MAML(Net(), inner_optim=INNER, outer_optim=ADAMW, vectorize_tasks=False),
    "maml-vectorized": lambda: MAML(
        Net(), inner_optim=INNER, outer_optim=ADAMW, vectorize_tasks=True
    ),
    "maml-learned-rates": lambda: MAML(
        Net(), inner_optim=INNER, outer_optim=SGD_DECAY, learn_inner_lr="per_layer"
    ),
    "meta-sgd": lambda: MetaSGD(Net(), inner_lr=0.1, outer_optim=ADAMW),
    "anil": lambda: ANIL(Net(), inner_optim=INNER, outer_optim=ADAMW),
    "imaml": lambda: IMAML(Net(), inner_optim=INNER, inner_steps=3, outer_optim=ADAMW),
}


@pytest.mark.parametrize(
    ("name", "accumulate"),
    [(name, 1) for name in CASES] + [("maml-loop", 2), ("maml-vectorized", 2)],
)
def test_unused_parameter_is_left_alone_by_weight_decay(name: str, accumulate: int) -> None:
    torch.manual_seed(0)
    module = CASES[name]()
    seen: list[dict[str, bool]] = []
    original = module.on_before_optimizer_step

    def record(optimizer: torch.optim.Optimizer) -> None:
        original(optimizer)
        seen.append({n: p.grad is not None for n, p in module.named_parameters()})

    module.on_before_optimizer_step = record  # type: ignore[method-assign]
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        inference_mode=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accumulate_grad_batches=accumulate,
    ).fit(module, datamodule=sinusoid(meta_batch_size=2, train_batches_per_epoch=6))
    after = dict(module.named_parameters())
    # The spare weight and (with learned rates) its own inner rate are used by no loss.
    index = [n for n, _ in module.model.named_parameters()].index("spare")
    unused = {"model.spare"} | ({f"inner_lrs.{index}"} if len(module.inner_lrs) else set())
    assert len(seen) == 3
    for grads in seen:
        assert {n for n, has in grads.items() if not has} == unused
    for n in unused:
        assert torch.equal(after[n], before[n]), n
    assert all(not torch.equal(after[n], before[n]) for n in before if n not in unused)
