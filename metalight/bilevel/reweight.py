"""Learned per-example weights of the training loss (learning to reweight examples)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalight.bilevel.module import BilevelModule, InnerBatch, SplitSource

__all__ = ["Reweight"]


class Reweight(BilevelModule):
    """One learned weight per training example, tuned so that training helps validation.

    After Ren, Zeng, Yang & Urtasun, 2018, "Learning to Reweight Examples for Robust Deep
    Learning" (https://arxiv.org/abs/1803.09050): the inner loss is a weighted mean of the
    per-example losses, and the weights follow the gradient of a clean validation loss taken
    through the inner training. Ren et al. compute fresh weights for each batch from a
    one-step look-ahead; here each example keeps its weight across the run (a logit per
    example, ``weight = 2 * sigmoid(logit)``, starting at 1) and the hypergradient comes
    through ``inner_steps`` steps, so examples whose labels disagree with the validation data
    are weighted down for good. The weights of a batch are normalised to sum to one.

    The baseline is the same training with uniform weights: the same starting weights,
    optimizer, learning rate, number of inner steps and minibatch size, on the same (noisy)
    training split.

    Args:
        model: the network trained in the inner loop.
        num_train: the number of training examples (one weight each; the data module's
            ``train_size``).
        batch_size: the baseline's minibatch size (the data's inner batch size).
        **kwargs: :class:`~metalight.bilevel.BilevelModule` arguments.

    Example:
        >>> import torch
        >>> from metalight.bilevel import Reweight
        >>> module = Reweight(torch.nn.Linear(64, 10), num_train=1000)
        >>> module.example_weights(torch.tensor([0, 1])).tolist()
        [1.0, 1.0]
    """

    def __init__(
        self, model: nn.Module, *, num_train: int, batch_size: int = 32, **kwargs: Any
    ) -> None:
        super().__init__(model, **kwargs)
        if not isinstance(num_train, int) or num_train < 1:
            raise ValueError(
                f"num_train must be the number of training examples (an integer >= 1), got "
                f"{num_train!r}; set it to the data's train_size"
            )
        self.num_train = num_train
        self.batch_size = batch_size
        self.example_logits = nn.Parameter(torch.zeros(num_train))

    def example_weights(self, index: Tensor) -> Tensor:
        """The weights (in ``(0, 2)``, 1 at the start) of the training examples ``index``."""
        if index.numel() and int(index.max()) >= self.num_train:
            raise IndexError(
                f"training example {int(index.max())} has no weight: num_train is "
                f"{self.num_train}; set it to the data's train_size"
            )
        return 2 * torch.sigmoid(self.example_logits[index])

    def inner_loss(self, params: list[Tensor], batch: InnerBatch, step: int) -> Tensor:
        """The weighted mean cross-entropy of the batch."""
        losses = F.cross_entropy(self.predict(params, batch.x), batch.y, reduction="none")
        weights = self.example_weights(batch.rows).to(losses.dtype)
        return (weights * losses).sum() / weights.sum()

    def evaluate_method(self, splits: SplitSource) -> dict[str, float]:
        """The current inner model on the test split, and where the weight went."""
        metrics = super().evaluate_method(splits)
        noisy = getattr(splits, "noisy_mask", None)
        if isinstance(noisy, Tensor) and noisy.any() and (~noisy).any():
            with torch.no_grad():
                weights = self.example_weights(torch.arange(self.num_train, device=self.device))
                noisy = noisy.to(weights.device)
                metrics["weight_flipped"] = float(weights[noisy].mean())
                metrics["weight_clean"] = float(weights[~noisy].mean())
        return metrics

    def evaluate_baseline(self, splits: SplitSource) -> dict[str, float] | None:
        """Uniform weights: plain training for the same steps on the same data."""
        steps = self.inner_age * self.inner_steps
        x, y = splits.split_tensors("train")
        batches = self.minibatches(x, y, self.batch_size, self.seed)
        params = self.fit_plain(self.fresh_inner(None), batches, steps)
        return {**self.score(params, *splits.split_tensors("test")), "inner_steps": float(steps)}
