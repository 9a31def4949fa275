"""Argument checks shared by the samplers, streams and DataModules."""

from __future__ import annotations

__all__ = ["check_positive"]


def check_positive(**values: int) -> None:
    """Raises ValueError naming the first argument that is not a positive int (bools rejected)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}; use 1 or more.")
