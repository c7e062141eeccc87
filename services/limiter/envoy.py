"""Envoy's rate-limit protocol with envoyproxy/ratelimit's own semantics, decided by Ballast's store.

Answers are upstream's, for the same config and traffic:

* fixed windows aligned to the unit (a minute starts at :00, a day at 00:00 UTC; with
  `unit_multiplier` the window is that many units, aligned the same way);
* every descriptor is counted on its own, over its limit or not (upstream increments, then
  compares), with its own `hits_addend`, else the request's, else 1;
* OVER_LIMIT reports `limit_remaining` 0; `duration_until_reset` is the time to the window's end
  (whole seconds, rounded up, as upstream computes it from the Unix second);
* shadow-mode limits are counted and answered OK; unlimited ones answer OK with
  `limit_remaining` 2^32-1; a limit whose `name` another matched limit `replaces` is dropped;
* statistics per limit: total_hits, over_limit, near_limit (past 80%), within_limit and
  shadow_mode, split as upstream splits a request's hits across the thresholds.

All descriptors of a request go to the store in one call (one Redis round trip).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

from services.limiter.envoy_config import UNIT_MS, EnvoyConfig, EnvoyLimit, Match
from services.limiter.store.base import Kind, LimitOp, OpResult, Store

UINT32_MAX = 2**32 - 1


def _q(value: str) -> str:
    return quote(value, safe="")


@dataclass(frozen=True, slots=True)
class Descriptor:
    entries: tuple[tuple[str, str], ...]
    hits: int
    # Envoy's per-descriptor override (requests_per_unit, unit), if any.
    override: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class DescriptorVerdict:
    over: bool
    limit: EnvoyLimit | None
    remaining: int = 0
    reset_ms: int = 0


# (domain, key path) -> count; the key path is the stats key without the domain, as in
# upstream's `ratelimit.service.rate_limit.<domain>.<key path>.<stat>`.
StatKey = tuple[str, str]


@dataclass
class EnvoyStats:
    """envoyproxy/ratelimit's per-limit statistics."""

    total_hits: Counter[StatKey] = field(default_factory=Counter)
    over_limit: Counter[StatKey] = field(default_factory=Counter)
    near_limit: Counter[StatKey] = field(default_factory=Counter)
    within_limit: Counter[StatKey] = field(default_factory=Counter)
    shadow_mode: Counter[StatKey] = field(default_factory=Counter)


class EnvoyLimiter:
    def __init__(
        self,
        store: Store,
        config: Callable[[], EnvoyConfig | None],
        *,
        near_ratio: float = 0.8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.config = config
        self.near_ratio = near_ratio
        self.clock = clock
        self.stats = EnvoyStats()

    def _matches(self, domain: str, descriptors: Sequence[Descriptor]) -> list[Match | None]:
        config = self.config()
        if config is None or domain not in config.domains:
            return [None] * len(descriptors)
        matches: list[Match | None] = []
        for d in descriptors:
            if d.override is not None and d.override[1] in UNIT_MS:
                # Upstream: an override applies in a configured domain, never in shadow mode.
                key = domain + "." + ".".join(f"{k}_{v}" if v else k for k, v in d.entries)
                matches.append(Match(EnvoyLimit(key, d.override[0], d.override[1]), key, d.entries))
            else:
                matches.append(config.find(domain, d.entries))
        # Unlimited limits are answered before replacement is worked out, as upstream does.
        limited = [m for m in matches if m is not None and not m.limit.unlimited]
        replaced = {name for m in limited for name in m.limit.replaces}
        return [None if m is not None and m.limit.name and m.limit.name in replaced else m for m in matches]

    async def should_rate_limit(
        self, domain: str, descriptors: Sequence[Descriptor]
    ) -> tuple[bool, list[DescriptorVerdict]]:
        """(over limit overall, one verdict per descriptor)."""
        matches = self._matches(domain, descriptors)
        tag = "{rls:" + _q(domain) + "}"
        ops: list[LimitOp] = []
        op_of: dict[int, int] = {}
        for i, (d, m) in enumerate(zip(descriptors, matches, strict=True)):
            if m is None or m.limit.unlimited:
                continue
            lim = m.limit
            path = ".".join(f"{_q(k)}_{_q(v)}" for k, v in m.counter)
            op_of[i] = len(ops)
            key = f"{tag}:{path}:{lim.window_ms}"
            ops.append(LimitOp(Kind.FIXED, key, lim.requests_per_unit, d.hits, lim.window_ms, lim.shadow))
        verdicts = [DescriptorVerdict(False, None if m is None else m.limit) for m in matches]
        if not ops:
            return False, verdicts
        outcome = await self.store.decide(ops)
        refused = outcome.degraded and not outcome.admitted  # fail mode `closed`: nothing is OK
        now_ms = int(self.clock() * 1000)
        over_all = False
        for i, j in op_of.items():
            m, op = matches[i], ops[j]
            assert m is not None
            if refused:
                reset = op.period_ms - now_ms % op.period_ms
                r = OpResult(True, 0, reset, reset, op.limit + op.cost)
            else:
                r = outcome.results[j]
            over = r.over and not op.shadow
            verdicts[i] = DescriptorVerdict(over, m.limit, 0 if r.over else r.remaining, r.reset_ms)
            self._count((domain, m.stats_key[len(domain) + 1 :]), op, r)
            over_all = over_all or over
        return over_all, verdicts

    def _count(self, key: StatKey, op: LimitOp, r: OpResult) -> None:
        """Upstream's split of one request's hits across the near and over thresholds."""
        s = self.stats
        hits = op.cost
        after = r.used
        before = max(0, after - hits)
        limit = op.limit
        near = math.floor(limit * self.near_ratio)
        s.total_hits[key] += hits
        if r.over:
            if before >= limit:
                s.over_limit[key] += hits
            else:
                s.over_limit[key] += max(0, after - limit)
                s.near_limit[key] += max(0, limit - max(near, before))
            if op.shadow:
                s.shadow_mode[key] += hits
        else:
            if after > near:
                s.near_limit[key] += hits if before >= near else max(0, after - near)
            s.within_limit[key] += hits
