"""Adaptive throttling from provider headroom: delay low priorities first, deny last.

The router reports each provider's remaining requests/tokens (from its rate-limit headers)
and its 429s. Headroom is the smallest remaining share (0 = exhausted, 1 = idle). Each
priority has two thresholds: under `delay_below` a request is told to wait (longer the
deeper the shortage, spread over the time until the provider's limits reset); under
`deny_below` it is denied until the reset. Higher priorities have lower thresholds, so
they keep going while lower ones wait: high priority goes first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from services.limiter.tiers import Throttle

# The fraction of a report that says "unknown until `until`" (the provider's breaker is open):
# it replaces older reports of that provider and model, and no judgement counts it.
UNKNOWN_HEADROOM = -1.0


@dataclass(frozen=True, slots=True)
class HeadroomReport:
    provider: str
    model: str
    # 0..1: the smallest remaining share of the provider's request and token limits.
    fraction: float
    # Epoch seconds after which the report no longer applies (provider reset or staleness).
    until: float
    # The provider answered 429.
    rate_limited: bool = False
    # Epoch seconds of the report: the newest report of a (provider, model) wins.
    at: float = 0.0
    # Epoch seconds when the provider said its limits are back to full (its x-ratelimit-reset-*
    # headers); the headroom refills towards it. 0 when unknown (a 429, or no reset header): the
    # fraction then holds until `until`.
    full_at: float = 0.0

    def fraction_at(self, now: float) -> float:
        """The headroom now: providers refill their limits steadily, so a report of an exhausted
        provider that nobody has called since is not still exhausted a while later."""
        if self.full_at <= self.at or now <= self.at or self.fraction < 0:
            return self.fraction
        refilled = min(1.0, (now - self.at) / (self.full_at - self.at))
        return self.fraction + (1.0 - self.fraction) * refilled

    def encode(self) -> str:
        return json.dumps(
            {
                "p": self.provider,
                "m": self.model,
                "f": self.fraction,
                "u": self.until,
                "r": self.rate_limited,
                "a": self.at,
                "z": self.full_at,
            }
        )

    @classmethod
    def decode(cls, raw: str) -> HeadroomReport | None:
        try:
            d = json.loads(raw)
            return cls(
                str(d["p"]),
                str(d["m"]),
                float(d["f"]),
                float(d["u"]),
                bool(d["r"]),
                float(d["a"]),
                float(d.get("z", 0.0)),  # absent in reports from older replicas
            )
        except (ValueError, KeyError, TypeError):
            return None


def headroom_fraction(
    remaining_requests: int, limit_requests: int, remaining_tokens: int, limit_tokens: int
) -> float | None:
    """The smallest known remaining share; None when the provider reported neither."""
    shares = []
    for remaining, limit in ((remaining_requests, limit_requests), (remaining_tokens, limit_tokens)):
        if remaining >= 0 and limit > 0:
            shares.append(min(1.0, remaining / limit))
    return min(shares) if shares else None


class HeadroomBoard:
    """The latest report per (provider, model), as this replica knows it."""

    def __init__(self) -> None:
        self._reports: dict[tuple[str, str], HeadroomReport] = {}

    def update(self, report: HeadroomReport) -> None:
        key = (report.provider, report.model)
        held = self._reports.get(key)
        if held is None or report.at >= held.at:
            self._reports[key] = report

    def merge(self, reports: list[HeadroomReport], now: float) -> None:
        """Adds reports shared by other replicas; the newest per (provider, model) wins."""
        for report in reports:
            self.update(report)
        self._reports = {k: r for k, r in self._reports.items() if r.until > now}

    def headroom(self, provider: str, now: float) -> tuple[float, float] | None:
        """(fraction, seconds until it no longer applies) for `provider`, or for the best
        provider when `provider` is empty (the router may pick any); None when unknown."""
        live = [r for r in self._reports.values() if r.until > now and r.fraction >= 0]
        if provider:
            mine = [r for r in live if r.provider == provider]
            if not mine:
                return None
            worst = min(mine, key=lambda r: r.fraction_at(now))
            return worst.fraction_at(now), worst.until - now
        by_provider: dict[str, HeadroomReport] = {}
        for r in live:
            held = by_provider.get(r.provider)
            if held is None or r.fraction_at(now) < held.fraction_at(now):
                by_provider[r.provider] = r
        if not by_provider:
            return None
        best = max(by_provider.values(), key=lambda r: r.fraction_at(now))
        return best.fraction_at(now), best.until - now


@dataclass(frozen=True, slots=True)
class ThrottleVerdict:
    # "allow", "delay" or "deny"
    action: str
    seconds: float = 0.0
    headroom: float = 1.0


ALLOW = ThrottleVerdict("allow")


def judge(policy: Throttle, priority: str, headroom: tuple[float, float] | None) -> ThrottleVerdict:
    if headroom is None:
        return ALLOW
    fraction, applies_for = headroom
    rule = policy.policies[priority]
    if fraction < rule.deny_below:
        return ThrottleVerdict("deny", max(0.001, applies_for), fraction)
    if fraction < rule.delay_below:
        span = rule.delay_below - rule.deny_below
        depth = 1.0 if span <= 0 else (rule.delay_below - fraction) / span
        wait = depth * min(applies_for, policy.max_delay)
        return ThrottleVerdict("delay", max(0.001, wait), fraction)
    return ThrottleVerdict("allow", 0.0, fraction)
