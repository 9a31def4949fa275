"""MAML trained by a real Trainer on a model that uses one module object at two places.

The user report: the first meta-step left fast weights inside the model, so the outer
optimizer updated orphaned Parameters and the second meta-step failed. Here three meta-steps
run on both paths (per-task loop and task-vectorised), and the model's weights must equal an
outer SGD loop over the hand-written meta-gradient of ``tests/engine/reference.py``.
"""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from torch import nn

from metalight.algorithms import MAML
from metalight.data import TaskBatch
from tests.engine.reference import reference_unroll
from tests.engine.zoo import STRUCTURES

META_STEPS, TASKS, INNER_STEPS, OUTER_LR = 3, 2, 2, 0.1


def _batches() -> list[TaskBatch]:
    gen = torch.Generator().manual_seed(3)

    def field(*shape: int) -> torch.Tensor:
        return torch.randn(TASKS, *shape, generator=gen, dtype=torch.float64)

    return [
        TaskBatch(field(5, 3), field(5, 2), field(6, 3), field(6, 2), torch.zeros(TASKS, 1))
        for _ in range(META_STEPS)
    ]


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vectorized"])
def test_maml_trains_a_model_with_a_shared_module(vectorize: bool) -> None:
    structure = next(s for s in STRUCTURES if s.name == "shared_module")
    torch.manual_seed(0)
    model = structure.build().double()
    twin = structure.build().double()
    twin.load_state_dict(model.state_dict())
    own = list(model.named_parameters(remove_duplicate=False))
    inner = functools.partial(torch.optim.SGD, lr=0.3, momentum=0.5)
    maml = MAML(
        model,
        inner_optim=inner,
        inner_steps=INNER_STEPS,
        outer_optim=functools.partial(torch.optim.SGD, lr=OUTER_LR),
        vectorize_tasks=vectorize,
    )
    batches = _batches()
    trainer = L.Trainer(
        max_steps=META_STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        inference_mode=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(maml, torch.utils.data.DataLoader(batches, batch_size=None))
    assert maml._use_vectorized() is vectorize

    # The outer loop by hand: SGD on the mean over tasks of the reference meta-gradient.
    for batch in batches:
        total = [torch.zeros_like(p) for p in twin.parameters()]
        for t in range(TASKS):
            _, grads = reference_unroll(
                twin,
                structure.call,
                torch.optim.SGD,
                {"lr": 0.3, "momentum": 0.5},
                (batch.support_x[t], batch.support_y[t]),
                (batch.query_x[t], batch.query_y[t]),
                INNER_STEPS,
            )
            total = [a + g / TASKS for a, g in zip(total, grads, strict=True)]
        with torch.no_grad():
            for p, g in zip(twin.parameters(), total, strict=True):
                p.sub_(OUTER_LR * g)

    for (name, p), (_, q) in zip(own, model.named_parameters(remove_duplicate=False), strict=True):
        assert q is p and isinstance(q, nn.Parameter) and q.grad_fn is None, name
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), msg=lambda m, n=name: f"{n}: {m}")
    assert model.state_dict().keys() == twin.state_dict().keys()
