"""Exponential backoff, in one place: the wait before each retry doubles, up to a cap.

Used by every loop that retries a backend (the cache's change-stream follower, the router's
shared hints and headroom reports, the edge's job retries and webhook deliveries), so that
"how long after the n-th failure" has one answer.
"""

from __future__ import annotations

# 2**64 times any positive base is past every cap; a larger exponent would only overflow.
_MAX_DOUBLINGS = 64


def exponential(base: float, attempt: int, cap: float) -> float:
    """The wait before retry number `attempt` (1 for the first): base, 2·base, 4·base, … ≤ cap."""
    doublings = min(max(attempt - 1, 0), _MAX_DOUBLINGS)
    return min(cap, base * 2.0**doublings)


class Backoff:
    """Consecutive failures of one loop: `failed()` gives the next wait, `succeeded()` resets."""

    def __init__(self, base: float, cap: float) -> None:
        if base <= 0 or cap < base:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={base} cap={cap}")
        self.base = base
        self.cap = cap
        self.failures = 0

    def failed(self) -> float:
        self.failures += 1
        return exponential(self.base, self.failures, self.cap)

    def succeeded(self) -> None:
        self.failures = 0
