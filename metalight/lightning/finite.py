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
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = [
    "FiniteChecks",
    "NonFiniteError",
    "all_finite",
    "describe_nonfinite_inner_loss",
    "peak",
]


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

    def expect_inner_loss(
        self, loss: Tensor, step: int, names: Sequence[str], params: Sequence[Tensor]
    ) -> None:
        """Expect a finite inner loss at ``step``, computed from the fast weights ``params``.

        The error names the step and says whether the weights had already gone bad (and
        where) or were finite (and how large).
        """

        def fail() -> None:
            weights = zip(names, params, strict=True)
            raise NonFiniteError(describe_nonfinite_inner_loss(loss, step, weights))

        self.expect([loss], fail)

    def expect_final_weights(
        self, names: Sequence[str], params: Sequence[Tensor], steps: int
    ) -> None:
        """Expect finite fast weights after the last of ``steps`` inner steps."""

        # Earlier steps are covered by the next step's loss check; the last one is not.
        def fail() -> None:
            bad = [n for n, p in zip(names, params, strict=True) if not all_finite([p])]
            raise NonFiniteError(
                f"non-finite fast weights in {', '.join(repr(n) for n in bad)} after inner step "
                f"{steps - 1} (an infinite gradient or a too large inner learning rate; lower "
                "the rate or clip gradients with grad_callback)"
            )

        self.expect(params, fail)

    def expect_query_loss(self, loss: Tensor, steps: int) -> None:
        """Expect a finite query loss after ``steps`` inner steps."""
        query = loss.detach()

        def fail() -> None:
            raise NonFiniteError(f"non-finite query loss {query.item()} after {steps} inner steps")

        self.expect([query], fail)

    def expect_meta_gradient(self, grads: Sequence[Tensor | None]) -> None:
        """Expect a finite meta-gradient."""
        self.expect(grads, _raise_nonfinite_meta_gradient)

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


def _raise_nonfinite_meta_gradient() -> None:
    raise NonFiniteError("non-finite meta-gradient")


def describe_nonfinite_inner_loss(
    loss: Tensor, step: int, fast_weights: Iterable[tuple[str, Tensor]]
) -> str:
    """The message for a non-finite inner loss at ``step`` with these (name, weight) pairs."""
    weights = [(n, p.detach()) for n, p in fast_weights]
    bad = [n for n, p in weights if not bool(torch.isfinite(p).all())]
    if bad:
        where = (
            f"; fast weights already non-finite: {', '.join(bad)} (from inner step "
            f"{step - 1}: lower the inner learning rate or clip gradients with grad_callback)"
        )
    elif weights:
        name, largest = max(((n, p.abs().max().item()) for n, p in weights), key=lambda t: t[1])
        where = (
            f" (the fast weights are finite; the largest is {largest:.3g} in {name!r}: a "
            "diverging inner loop points to a too large inner learning rate, a small one "
            "to non-finite support data or loss)"
        )
    else:
        where = ""
    return f"non-finite inner loss {loss.detach().item()} at inner step {step}{where}"
