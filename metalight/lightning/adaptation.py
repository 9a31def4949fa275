"""``Adaptation``: what adapting to one support set gives back, the fast weights and a predictor.

:meth:`metalight.lightning.MetaLearningModule.adapt` makes it; ``predict``, ``predict_labels``
and ``predict_proba`` use the adapted weights without touching the module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Adaptation"]


class Adaptation:
    """The result of adapting to one support set: the adapted fast weights and a predictor.

    Made by :meth:`MetaLearningModule.adapt`. Adapted under ``torch.no_grad()`` (or with the
    argument ``create_graph=False`` for inference), it predicts without keeping a graph.

    Attributes:
        fast_params: the adapted fast weights (in the adapted module's order).
        classification: whether the support targets were class labels (None: not known).

    Example:
        >>> import torch
        >>> from metalight.lightning import MetaLearningModule
        >>> from metalight.models import MLP
        >>> module = MetaLearningModule(MLP(2, (8,), 3), eval_inner_steps=2)
        >>> adaptation = module.adapt(torch.randn(6, 2), torch.arange(3).repeat(2))
        >>> adaptation.predict_labels(torch.randn(4, 2)).shape
        torch.Size([4])
        >>> adaptation.predict_proba(torch.randn(4, 2)).sum(-1).allclose(torch.ones(4))
        True
    """

    def __init__(
        self,
        predict: Callable[[Tensor], Tensor],
        fast_params: list[Tensor],
        *,
        classification: bool | None = None,
        no_grad: bool = False,
        support_y: Tensor | None = None,
        like: Tensor | None = None,
    ) -> None:
        self._predict = predict
        self.fast_params = fast_params
        self.classification = classification
        self._no_grad = no_grad
        self._support_y = support_y
        self._like = like
        self._classes: Tensor | None = None

    @property
    def classes(self) -> Tensor | None:
        """The sorted labels of the support set's classes (None: not known, or regression).

        :meth:`predict_labels` and :meth:`predict_proba` choose among these only: an output
        no support example was labelled with names no class of this support set.
        """
        if self._classes is None and self._support_y is not None and self.classification:
            # Computed on first use: the training loop's adaptations need no host sync.
            self._classes = torch.unique(self._support_y.detach())
        return self._classes

    def predict(self, x: Tensor) -> Tensor:
        """The outputs for ``x`` with the adapted weights (logits for classification).

        Floating-point inputs are cast to the model's dtype and moved to its device (the
        outputs are on the model's device).
        """
        x = self._model_input(x)
        if self._no_grad:
            with torch.no_grad():
                return self._predict(x)
        return self._predict(x)

    def predict_proba(self, x: Tensor) -> Tensor:
        """Class probabilities for ``x``: the softmax of :meth:`predict`'s logits over the
        support set's classes (the other outputs get probability 0)."""
        self._require_classification("predict_proba")
        return self._support_logits(self.predict(x)).softmax(-1)

    def predict_labels(self, x: Tensor) -> Tensor:
        """The most probable support class of each input of ``x`` (no gradient)."""
        self._require_classification("predict_labels")
        with torch.no_grad():
            return self._support_logits(self._predict(self._model_input(x))).argmax(-1)

    def _model_input(self, x: Tensor) -> Tensor:
        like = self._like
        if like is None or not isinstance(x, Tensor):
            return x
        dtype = like.dtype if torch.is_floating_point(x) else x.dtype
        return x.to(device=like.device, dtype=dtype)

    def _support_logits(self, logits: Tensor) -> Tensor:
        classes = self.classes
        if classes is None:
            return logits
        other = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
        other[classes.to(logits.device)] = False
        return logits.masked_fill(other, float("-inf"))

    def _require_classification(self, method: str) -> None:
        if self.classification is False:
            raise ValueError(
                f"{method}() needs a classification task, but this adaptation was to "
                "regression targets (floating point): use predict(x) for the outputs"
            )
