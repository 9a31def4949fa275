"""Argument checks shared by the samplers, streams and DataModules, and their error type.

The data layer names its own arguments (``meta_batch_size``, ``seed``) and never the
command line's keys: :class:`DataArgumentError` carries the arguments at fault, and the
``metalight`` command (``metalight.run``) maps them to its config keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["DataArgumentError", "check_positive"]


class DataArgumentError(ValueError):
    """A data argument (or a Trainer setting the data depends on) that cannot work.

    Args:
        message: what is wrong and how to fix it, in the words of the Python API.
        arguments: the arguments to change, each with the value that fixes it (``None`` where
            no single value does). Besides the data module's own arguments, Trainer
            arguments may appear (``limit_val_batches``).

    Example:
        >>> err = DataArgumentError("seed differs from the checkpoint's", {"seed": 0})
        >>> err.arguments
        {'seed': 0}
    """

    def __init__(self, message: str, arguments: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.arguments: dict[str, Any] = dict(arguments or {})

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable with its arguments (errors cross process boundaries in DataLoader workers).
        return (type(self), (str(self), self.arguments))


def check_positive(**values: int) -> None:
    """Raises DataArgumentError naming the first argument that is not a positive int (bools
    rejected).

    The error lists no arguments to map: the samplers and streams check arguments of their
    own (``num_episodes``) that are no data module's; the message names it.
    """
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise DataArgumentError(
                f"{name} must be a positive integer, got {value!r}; use 1 or more."
            )
