"""Backoff: doubling waits up to a cap, reset by a success."""

from __future__ import annotations

import pytest

from services.kit.backoff import Backoff, exponential


def test_waits_double_up_to_the_cap() -> None:
    assert [exponential(0.5, n, 3.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert exponential(0.5, 0, 3.0) == 0.5
    assert exponential(0.1, 10_000, 30.0) == 30.0  # no overflow on a long outage


def test_a_success_starts_the_doubling_again() -> None:
    backoff = Backoff(0.1, 5.0)
    assert [backoff.failed() for _ in range(3)] == [0.1, 0.2, 0.4]
    backoff.succeeded()
    assert backoff.failed() == 0.1 and backoff.failures == 1


def test_a_backoff_that_cannot_wait_is_refused() -> None:
    with pytest.raises(ValueError, match="base"):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError, match="cap"):
        Backoff(2.0, 1.0)
