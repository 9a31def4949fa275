"""Sinusoid regression tasks with the distribution of the MAML paper (Finn et al., 2017)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from metalight.data._validation import check_positive
from metalight.data.task import Task

__all__ = ["SinusoidTasks"]


class SinusoidTasks:
    """Draws sinusoid regression tasks ``y = amplitude * sin(x - phase)``.

    Defaults follow MAML: amplitude ``U[0.1, 5]``, phase ``U[0, pi]``, inputs ``U[-5, 5]``.
    Needs no download. ``Task.info`` is ``(amplitude, phase)``; inputs and targets are float32
    of shape ``[n, 1]``.

    Args:
        shots: Support points per task (K).
        queries: Random query points per task (ignored with ``query_grid``).
        query_grid: Use ``grid_points`` evenly spaced query inputs over ``x_range`` instead
            of random ones (MAML's test protocol: 100 points over ``[-5, 5]``).
        grid_points: Number of grid query points.
        amplitude_range: ``(low, high)`` of the uniform amplitude.
        phase_range: ``(low, high)`` of the uniform phase.
        x_range: ``(low, high)`` of the inputs.

    Example:
        >>> tasks = SinusoidTasks(shots=10, query_grid=True)
        >>> task = tasks.sample(torch.Generator().manual_seed(0))
        >>> task.support_x.shape, task.query_x.shape, task.info.shape
        (torch.Size([10, 1]), torch.Size([100, 1]), torch.Size([2]))
    """

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        *,
        query_grid: bool = False,
        grid_points: int = 100,
        amplitude_range: tuple[float, float] = (0.1, 5.0),
        phase_range: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        check_positive(shots=shots, queries=queries, grid_points=grid_points)
        for name, (low, high) in (
            ("amplitude_range", amplitude_range),
            ("phase_range", phase_range),
            ("x_range", x_range),
        ):
            if not low <= high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(low, high)}.")
        self.shots = shots
        self.queries = queries
        self.query_grid = query_grid
        self.grid_points = grid_points
        self.amplitude_range = (float(amplitude_range[0]), float(amplitude_range[1]))
        self.phase_range = (float(phase_range[0]), float(phase_range[1]))
        self.x_range = (float(x_range[0]), float(x_range[1]))

    @staticmethod
    def function(x: Tensor, info: Tensor) -> Tensor:
        """Evaluates ``amplitude * sin(x - phase)`` for ``info = (amplitude, phase)``."""
        return info[..., 0:1] * torch.sin(x - info[..., 1:2])

    def _uniform(
        self, shape: tuple[int, ...], bounds: tuple[float, float], g: torch.Generator
    ) -> Tensor:
        low, high = bounds
        return torch.rand(shape, generator=g).mul_(high - low).add_(low)

    def sample(self, generator: torch.Generator) -> Task:
        """Draws one task using only ``generator`` for randomness."""
        amplitude = self._uniform((1,), self.amplitude_range, generator)
        phase = self._uniform((1,), self.phase_range, generator)
        info = torch.cat([amplitude, phase])
        support_x = self._uniform((self.shots, 1), self.x_range, generator)
        if self.query_grid:
            query_x = torch.linspace(*self.x_range, self.grid_points).unsqueeze(1)
        else:
            query_x = self._uniform((self.queries, 1), self.x_range, generator)
        return Task(
            support_x=support_x,
            support_y=self.function(support_x, info),
            query_x=query_x,
            query_y=self.function(query_x, info),
            info=info,
        )

    def __repr__(self) -> str:
        queries = f"grid of {self.grid_points}" if self.query_grid else str(self.queries)
        return f"{type(self).__name__}(shots={self.shots}, queries={queries})"
