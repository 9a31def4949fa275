"""FiniteChecks: checks at once, or deferred to the end of a block with one host sync."""

from __future__ import annotations

import pytest
import torch

from metalight.lightning import NonFiniteError
from metalight.lightning.finite import FiniteChecks, all_finite
from tests.lightning.test_meta_gradients import count_host_syncs

NAN = torch.tensor([1.0, float("nan")])


def failing(label: str, seen: list[str]):  # type: ignore[no-untyped-def]
    def fail() -> None:
        seen.append(label)
        raise NonFiniteError(label)

    return fail


def test_checks_run_at_once_outside_a_deferred_block() -> None:
    checks, seen = FiniteChecks(), []
    with pytest.raises(NonFiniteError, match="now"):
        checks.expect([NAN], failing("now", seen))
    with checks.deferred(enabled=False), pytest.raises(NonFiniteError, match="disabled"):
        checks.expect([NAN], failing("disabled", seen))


def test_deferred_checks_share_one_sync_and_the_first_failure_raises() -> None:
    checks, seen = FiniteChecks(), []

    def block() -> None:
        with checks.deferred():
            checks.expect([torch.ones(3)], failing("a", seen))
            checks.expect([NAN], failing("b", seen))
            checks.expect([torch.tensor(float("inf"))], failing("c", seen))
            assert seen == []  # nothing checked yet

    with pytest.raises(NonFiniteError, match="b"):
        block()
    assert seen == ["b"]
    clean = FiniteChecks()

    def clean_block() -> None:
        with clean.deferred():
            for _ in range(5):
                clean.expect([torch.ones(3), None, torch.zeros(0)], failing("x", seen))

    assert count_host_syncs(clean_block) == 1


def test_a_raising_block_drops_its_waiting_checks() -> None:
    checks, seen = FiniteChecks(), []

    def block() -> None:
        with checks.deferred():
            checks.expect([NAN], failing("late", seen))
            raise KeyError("first")

    with pytest.raises(KeyError):
        block()
    assert seen == []
    # Afterwards checks run at once again.
    with pytest.raises(NonFiniteError):
        checks.expect([NAN], failing("after", seen))


def test_all_finite_near_the_dtype_maximum() -> None:
    big = torch.full((4,), torch.finfo(torch.float32).max)
    assert all_finite([big, None])  # a sum would overflow to Inf
    assert not all_finite([big, NAN])
