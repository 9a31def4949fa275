"""NaN/Inf checks of the inner loop: the error, the checks, and checks deferred to one sync.

Reading a tensor back to Python (``bool``, ``item``) waits for the device. The per-task
training loop checks every inner loss, the final fast weights, the query loss and the
meta-gradient; inside :meth:`FiniteChecks.deferred` those checks wait for the end of the block
and cost one host sync together, and the first one that fails raises as it would have at its
place.

Example:
    >>> import torch
    >>> from metalight.lightning.finite import FiniteChecks, NonFiniteError
    >>> checks = FiniteChecks()
    >>> def fail():
    ...     raise NonFiniteError("the loss went bad")
    >>> with checks.deferred():
    ...     checks.expect([torch.tensor(1.0)], fail)  # waits for the end of the block
    >>> try:
    ...     with checks.deferred():
    ...         checks.expect([torch.tensor(float("nan"))], fail)
    ... except NonFiniteError as err:
    ...     print(err)
    the loss went bad
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["FiniteChecks", "NonFiniteError", "all_finite", "peak"]


class NonFiniteError(FloatingPointError):
    """A NaN or Inf appeared in an inner step (loss, gradient or fast weights)."""


def peak(tensors: Sequence[Tensor | None]) -> Tensor | None:
    """The largest magnitude over many tensors (no host sync), or None for none.

    It is finite only if every entry is; a sum would not do: finite entries near the
    dtype's maximum add up to Inf (a false alarm).
    """
    present = [t for t in tensors if t is not None and t.numel()]
    if not present:
        return None
    with torch.no_grad():
        try:
            norms = list(torch._foreach_norm(present, float("inf")))
        except RuntimeError:  # tensors on several devices
            norms = [torch.linalg.vector_norm(t, float("inf")) for t in present]
        if len({n.dtype for n in norms}) > 1 or len({n.device for n in norms}) > 1:
            norms = [n.float().to(norms[0].device) for n in norms]
        return torch.stack(norms).amax()


def all_finite(tensors: Sequence[Tensor | None]) -> bool:
    """Whether every entry of ``tensors`` is finite, with one host sync."""
    largest = peak(tensors)
    return largest is None or math.isfinite(largest.item())


class FiniteChecks:
    """NaN/Inf checks that run at once, or wait for the end of a :meth:`deferred` block."""

    def __init__(self) -> None:
        self._pending: list[tuple[list[Tensor | None], Callable[[], None]]] | None = None

    def expect(self, tensors: Sequence[Tensor | None], fail: Callable[[], None]) -> None:
        """Call ``fail`` (which raises) unless every entry of ``tensors`` is finite."""
        if self._pending is not None:
            self._pending.append((list(tensors), fail))
        elif not all_finite(tensors):
            fail()

    @contextmanager
    def deferred(self, enabled: bool = True) -> Iterator[None]:
        """Defer the checks made inside the block to its end (one host sync for all).

        On a clean exit the waiting checks run and the first failing one raises; when the
        block raises, its waiting checks are dropped. ``enabled=False`` checks at once.
        """
        if not enabled:
            yield
            return
        self._pending = []
        try:
            yield
            pending, self._pending = self._pending, None
            if pending and not all_finite([t for tensors, _ in pending for t in tensors]):
                for tensors, fail in pending:
                    if not all_finite(tensors):
                        fail()
        finally:
            self._pending = None
