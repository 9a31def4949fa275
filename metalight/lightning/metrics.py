"""Evaluation metrics over episodes that never hide a diverged episode.

Validation and test adapt to every episode and record its query loss and accuracy before
adaptation, after ``eval_report_steps`` inner steps and after all of them. An episode whose
adaptation diverged (a NaN or Inf query loss) is not averaged in, since one NaN would make
every mean NaN, but it is counted: each evaluation reports ``diverged`` next to the means,
so "0.607 +- 0.313 over 15 tasks" reads together with "5 diverged of 20" (torchmetrics'
own aggregators would drop the NaN values silently or with a warning).

Logged keys, for stage ``val`` or ``test`` (``<stage>/...``):

* ``loss_pre``, ``loss_post``, ``loss_step<k>`` and for classification ``acc_pre``,
  ``acc_post``, ``acc_step<k>``: means over the finite episodes (NaN when none was finite);
* ``acc_post_ci95`` (classification) or ``loss_post_ci95`` (regression): the half-width of
  the 95% confidence interval of the mean over the finite episodes (NaN below two);
* ``episodes``: the number of finite episodes (those in the means and the interval);
* ``diverged``: the number of diverged episodes;
* ``episodes_total``: every evaluated episode, ``episodes + diverged``.

Example:
    >>> import torch
    >>> from metalight.lightning.metrics import EpisodeMetrics
    >>> metrics = EpisodeMetrics(report_steps=[1])
    >>> metrics.record("test", {"loss_pre": torch.tensor(2.0), "loss_step1": torch.tensor(1.0),
    ...                         "loss_post": torch.tensor(0.5)}, classification=False)
    True
    >>> metrics.record("test", {"loss_pre": torch.tensor(2.0), "loss_step1": torch.tensor(9.0),
    ...                         "loss_post": torch.tensor(float("nan"))}, classification=False)
    False
    >>> result = metrics.compute("test")
    >>> result["test/loss_post"], result["test/episodes"], result["test/diverged"]
    (0.5, 1.0, 1.0)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

__all__ = ["EpisodeMetrics"]

# Positions in _Totals.moments.
_FINITE, _DIVERGED, _SUM, _SUM_SQUARES = range(4)


class _Totals(Metric):
    """Sums over episodes (summed over ranks under DDP): per-metric sums and counts, and the
    finite and diverged counts with the headline value's sum and sum of squares."""

    full_state_update = False

    def __init__(self, n: int) -> None:
        super().__init__()
        zeros = torch.zeros(n, dtype=torch.float64)
        self.sums: Tensor
        self.counts: Tensor
        self.moments: Tensor
        self.add_state("sums", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("counts", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("moments", default=torch.zeros(4, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, sums: Tensor, counts: Tensor, moments: Tensor) -> None:
        # New tensors, not in-place additions: under ddp_spawn the module reaches each
        # process through torch.multiprocessing, which puts CPU tensors in shared memory,
        # so the processes' initial states are one storage and += would count every
        # process's episodes in each.
        self.sums = self.sums + sums.to(self.sums)
        self.counts = self.counts + counts.to(self.counts)
        self.moments = self.moments + moments.to(self.moments)

    def compute(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.sums, self.counts, self.moments


class EpisodeMetrics(nn.Module):
    """Per-episode evaluation metrics of the ``val`` and ``test`` stages.

    The totals are a torchmetrics ``Metric``, so under DDP :meth:`compute` sums them over
    all ranks (every rank must call it, as Lightning's epoch-end hooks do). Nothing
    non-finite ever reaches them: :meth:`record` sorts diverged episodes out first.

    Args:
        report_steps: the extra step counts whose query loss (and accuracy) are recorded.
        stages: the evaluation stages.
    """

    def __init__(
        self, report_steps: Sequence[int] = (), stages: Sequence[str] = ("val", "test")
    ) -> None:
        super().__init__()
        self.names = ["loss_pre", "loss_post", "acc_pre", "acc_post"]
        self.names += [f"{kind}_step{s}" for s in report_steps for kind in ("loss", "acc")]
        self._index = {name: i for i, name in enumerate(self.names)}
        self.totals = nn.ModuleDict({stage: _Totals(len(self.names)) for stage in stages})
        # Whether the stage's episodes were classification ones (known from the targets even
        # when every episode diverged).
        self._classification: dict[str, bool] = {}

    def record(self, stage: str, values: Mapping[str, Tensor], *, classification: bool) -> bool:
        """Record one episode's values (scalars keyed by metric name, e.g. ``loss_post``).

        An episode with any non-finite loss counts as diverged and none of its values enter
        a mean (the accuracy of NaN outputs would be finite and meaningless). One host sync.

        Returns:
            Whether the episode was finite (recorded in the means).
        """
        self._classification[stage] = classification
        names = list(values)
        stacked = torch.stack([values[n].detach().double().reshape(()) for n in names]).cpu()
        losses = torch.tensor([n.startswith("loss_") for n in names])
        moments = torch.zeros(4, dtype=torch.float64)
        if not bool(torch.isfinite(stacked[losses]).all()):
            self.record_diverged(stage, classification=classification)
            return False
        sums = torch.zeros(len(self.names), dtype=torch.float64)
        counts = torch.zeros(len(self.names), dtype=torch.float64)
        for name, value in zip(names, stacked, strict=True):
            sums[self._index[name]] = value
            counts[self._index[name]] = 1
        headline = stacked[names.index("acc_post" if classification else "loss_post")]
        moments[_FINITE] = 1
        moments[_SUM] = headline
        moments[_SUM_SQUARES] = headline * headline
        self.totals[stage].update(sums, counts, moments)
        return True

    def record_diverged(self, stage: str, *, classification: bool) -> None:
        """Count an episode whose adaptation raised before it could be recorded."""
        self._classification[stage] = classification
        moments = torch.zeros(4, dtype=torch.float64)
        moments[_DIVERGED] = 1
        zeros = torch.zeros(len(self.names), dtype=torch.float64)
        self.totals[stage].update(zeros, zeros, moments)

    def compute(self, stage: str) -> dict[str, float]:
        """The stage's logged values (see the module docstring), keyed ``<stage>/<name>``."""
        classification = self._classification.get(stage, False)
        with warnings.catch_warnings():
            # A rank (or an evaluation) without episodes: its totals are zeros, which is right.
            warnings.filterwarnings("ignore", r".*compute.*before.*update", UserWarning)
            sums, counts, moments = (t.cpu() for t in self.totals[stage].compute())
        finite, diverged = int(moments[_FINITE]), int(moments[_DIVERGED])
        result: dict[str, float] = {}
        for name, total, count in zip(self.names, sums.tolist(), counts.tolist(), strict=True):
            if name.startswith("acc_") and not classification:
                continue
            result[f"{stage}/{name}"] = total / count if count else math.nan
        key = "acc_post_ci95" if classification else "loss_post_ci95"
        ci = math.nan
        if finite > 1:
            mean = float(moments[_SUM]) / finite
            variance = max(float(moments[_SUM_SQUARES]) - finite * mean * mean, 0.0) / (finite - 1)
            ci = 1.96 * math.sqrt(variance) / math.sqrt(finite)
        result[f"{stage}/{key}"] = ci
        result[f"{stage}/episodes"] = float(finite)
        result[f"{stage}/diverged"] = float(diverged)
        result[f"{stage}/episodes_total"] = float(finite + diverged)
        return result

    def reset(self, stage: str) -> None:
        """Forget the stage's episodes (at the end of each evaluation)."""
        self.totals[stage].reset()
