"""Metric labels whose values come from callers, kept to a bounded number of series."""

from __future__ import annotations

#: The tenant label of every tenant past BALLAST_METRICS_MAX_TENANTS (no id has parentheses).
OTHER_TENANTS = "(other)"


class BoundedLabel:
    """A label that takes at most `limit` distinct values: the first `limit` values seen keep
    their name, every later one is reported as `other`. Series stay bounded per replica even
    when callers bring new values (tenants); the sum over the label stays exact."""

    def __init__(self, limit: int, other: str = OTHER_TENANTS) -> None:
        if limit < 1:
            raise ValueError(f"a bounded label needs a limit of at least 1, not {limit}")
        self._limit = limit
        self._other = other
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return self._other
        self._seen.add(value)
        return value
