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


def test_labels_and_probabilities_choose_among_the_support_classes_only() -> None:
    # A 3-output model used 2-way (labels 0 and 2) or 1-way: an output no support example
    # was labelled with names no class here, so it is never predicted.
    module = classifier()
    x, y = support_set()
    queries = torch.randn(40, 2, dtype=torch.float64) * 3
    for keep in ([0, 2], [1]):
        chosen = torch.isin(y, torch.tensor(keep))
        adaptation = module.adapt(x[chosen], y[chosen])
        logits = adaptation.predict(queries)
        masked = logits.clone()
        masked[:, [c for c in range(3) if c not in keep]] = float("-inf")
        assert torch.equal(adaptation.classes, torch.tensor(keep))
        assert torch.equal(adaptation.predict_labels(queries), masked.argmax(-1))
        assert set(adaptation.predict_labels(queries).tolist()) <= set(keep)
        probabilities = adaptation.predict_proba(queries)
        torch.testing.assert_close(probabilities, masked.softmax(-1))
        assert torch.equal(
            probabilities[:, [c for c in range(3) if c not in keep]].sum(), 0 * x[0, 0]
        )
    # Unmasked, some queries would have gone to a class absent from the 1-way support set.
    one_way = module.adapt(x[y == 1], y[y == 1])
    assert (one_way.predict(queries).argmax(-1) != 1).any()


def test_support_and_query_are_cast_to_the_model_and_labels_checked() -> None:
    module = classifier()  # float64 weights
    x, y = support_set()
    reference = module.adapt(x, y)
    # float32 inputs and int32 labels (as numpy gives them) adapt to the same weights.
    cast = module.adapt(x.float(), y.int())
    for a, b in zip(cast.fast_params, reference.fast_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    queries = torch.randn(5, 2, dtype=torch.float64)
    assert torch.equal(reference.predict_labels(queries.float()), reference.predict_labels(queries))
    assert reference.predict(queries.float()).dtype == torch.float64
    with pytest.raises(
        ValueError, match=r"labels must be 0\.\.2 \(the model has 3 outputs\), got 3, 7"
    ):
        module.adapt(x, torch.tensor([3, 7, 3, 7, 3, 7]))
    with pytest.raises(ValueError, match=r"labels must be 0\.\.2 .*got -1, 0, 1;"):
        module.adapt(x, y - 1)
    with pytest.raises(ValueError, match=r"one integer per input \(shape \[n\]\)"):
        module.adapt(x, y[:, None])
    with pytest.raises(TypeError, match=r"support_y holds class names; pass labels 0\.\.N-1"):
        module.adapt(x, ["a", "b", "c", "a", "b", "c"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"the support set is empty"):
        module.adapt(x[:0], y[:0])


def test_the_label_check_leaves_batchnorm_statistics_and_modes_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    module = MAML(model, inner_optim=functools.partial(torch.optim.SGD, lr=LR), eval_inner_steps=0)
    module.train()
    model[1].eval()  # the user keeps this one in eval mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = support_set()
    module.adapt(x, y)
    assert module.training and model[0].training and not model[1].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
