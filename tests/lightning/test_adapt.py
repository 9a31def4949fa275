"""``module.adapt(support_x, support_y)``: adapting a trained module to a new support set.

Checked against a hand-written float64 SGD loop, under ``torch.no_grad()`` and eval mode,
for classification (labels, probabilities) and regression, and the old ``adapt(task, steps,
create_graph=...)`` form the training and evaluation loops use. Also ``train/acc``.
"""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalight.algorithms import ANIL, MAML, Reptile
from metalight.data import Task, TaskBatch
from metalight.lightning import Adaptation, MetaLearningModule
from metalight.models import MLP
from tests.lightning.test_training import BlobTasks

LR = 0.3


def classifier() -> MetaLearningModule:
    torch.manual_seed(0)
    return MAML(
        MLP(2, (16,), 3).double(),
        inner_optim=functools.partial(torch.optim.SGD, lr=LR),
        inner_steps=1,
        eval_inner_steps=4,
    )


def support_set() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(3).repeat(2)
    return torch.randn(6, 2, generator=g, dtype=torch.float64) + 2 * y[:, None], y


def by_hand(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().requires_grad_() for p in model.parameters()]
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, dict(zip(names, params)), (x,)), y)
        grads = torch.autograd.grad(loss, params)
        params = [(p - LR * g).detach().requires_grad_() for p, g in zip(params, grads)]
    return [p.detach() for p in params]


def test_adapt_to_a_support_set_takes_eval_inner_steps() -> None:
    module = classifier()
    x, y = support_set()
    adaptation = module.adapt(x, y)
    assert isinstance(adaptation, Adaptation)
    want = by_hand(module.model, x, y, steps=4)
    assert len(adaptation.fast_params) == len(want)
    for got, w in zip(adaptation.fast_params, want, strict=True):
        torch.testing.assert_close(got, w)
    # The Task form (queries unused) is the same adaptation, bit for bit.
    task = Task(x, y, x[:2], y[:2], torch.arange(3))
    old = module.adapt(task, 4, create_graph=False)
    assert all(torch.equal(a, b) for a, b in zip(old.fast_params, adaptation.fast_params))
    two = module.adapt(x, y, steps=2)
    for got, w in zip(two.fast_params, by_hand(module.model, x, y, steps=2), strict=True):
        torch.testing.assert_close(got, w)


def test_labels_and_probabilities_of_a_classification_adaptation() -> None:
    module = classifier()
    x, y = support_set()
    adaptation = module.adapt(x, y)
    logits = adaptation.predict(x)
    assert logits.shape == (6, 3)
    assert torch.equal(adaptation.predict_labels(x), logits.argmax(-1))
    probabilities = adaptation.predict_proba(x)
    torch.testing.assert_close(probabilities, logits.softmax(-1))
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(6, dtype=torch.float64))
    # The labels of the hand-adapted weights.
    names = [n for n, _ in module.model.named_parameters()]
    weights = dict(zip(names, by_hand(module.model, x, y, steps=4)))
    queries = torch.randn(20, 2, dtype=torch.float64) * 3
    want = functional_call(module.model, weights, (queries,)).argmax(-1)
    assert torch.equal(adaptation.predict_labels(queries), want)
    assert not torch.equal(module.model(queries).argmax(-1), want)  # adaptation mattered


def test_adapt_under_no_grad_in_eval_mode() -> None:
    module = classifier()
    x, y = support_set()
    reference = module.adapt(x, y)
    module.eval()
    with torch.no_grad():
        adaptation = module.adapt(x, y)
        inside = adaptation.predict(x)
    assert not module.training and not inside.requires_grad
    assert all(not p.requires_grad for p in adaptation.fast_params)
    # Nothing handed back leads to the meta-parameters, even when used outside no_grad.
    assert not adaptation.predict(x).requires_grad
    assert not adaptation.predict_proba(x).requires_grad
    for a, b in zip(adaptation.fast_params, reference.fast_params, strict=True):
        assert torch.equal(a, b.detach())
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"under torch\.no_grad"):
        module.adapt(x, y)


def test_regression_predicts_outputs_and_has_no_labels() -> None:
    torch.manual_seed(0)
    module = MAML(MLP(), eval_inner_steps=3)
    x = torch.linspace(-5, 5, 10).unsqueeze(-1)
    adaptation = module.adapt(x, torch.sin(x))
    assert adaptation.predict(x).shape == (10, 1)
    with pytest.raises(ValueError, match=r"predict_labels\(\) needs a classification task"):
        adaptation.predict_labels(x)


def test_anil_adapts_to_a_support_set_without_queries() -> None:
    torch.manual_seed(0)
    module = ANIL(MLP(2, (16,), 3).double(), eval_inner_steps=3)
    x, y = support_set()
    adaptation = module.adapt(x, y)
    task = Task(x, y, x, y, torch.arange(3))
    old = module.adapt(task, 3, create_graph=False)
    assert all(torch.equal(a, b) for a, b in zip(adaptation.fast_params, old.fast_params))
    torch.testing.assert_close(adaptation.predict(x), old.predict(x))


def test_bad_adapt_arguments_are_explained() -> None:
    module = classifier()
    x, y = support_set()
    with pytest.raises(ValueError, match=r"6 inputs but 5 targets; pass one target per"):
        module.adapt(x, y[:5])
    with pytest.raises(ValueError, match=r"steps must be an integer >= 0, got -1"):
        module.adapt(x, y, steps=-1)
    with pytest.raises(TypeError, match=r"adapt\(\) takes \(support_x, support_y, steps\)"):
        module.adapt(x)


@pytest.mark.parametrize(
    ("algorithm", "vectorize"),
    [("maml", False), ("maml", True), ("reptile", False), ("reptile", True)],
)
def test_train_accuracy_is_the_query_accuracy_after_adaptation(
    algorithm: str, vectorize: bool
) -> None:
    torch.manual_seed(0)
    cls = MAML if algorithm == "maml" else Reptile
    module = cls(
        MLP(2, (16,), 3),
        inner_optim=functools.partial(torch.optim.SGD, lr=0.5),
        inner_steps=2,
        vectorize_tasks=vectorize,
    )
    assert module._use_vectorized() is vectorize
    (batch,) = list(BlobTasks(1, 4, seed=5))
    hits = []
    for task in batch:
        with torch.no_grad():
            predicted = module.adapt(task, 2).predict_labels(task.query_x)
        hits.append((predicted == task.query_y).float().mean())
    want = torch.stack(hits).mean()
    assert 0 < want < 1  # a value that a wrong task, step or split would change
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        inference_mode=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader([batch], batch_size=None))
    torch.testing.assert_close(trainer.callback_metrics["train/acc"], want)


def test_no_train_accuracy_for_regression() -> None:
    module = MAML(MLP(), vectorize_tasks=False)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        inference_mode=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    x = torch.randn(2, 5, 1)
    batch = TaskBatch(x, x.sin(), x, x.sin(), torch.zeros(2, 2))
    trainer.fit(module, torch.utils.data.DataLoader([batch], batch_size=None))
    assert "train/meta_loss" in trainer.callback_metrics
    assert "train/acc" not in trainer.callback_metrics
