"""Envoy's rate-limit protocol decided by Ballast's store: exact and atomic for every descriptor.

Where envoyproxy/ratelimit uses fixed windows (bursts up to 2x at a window edge), reads then
increments each descriptor separately (not atomic) and adds one request's hits_addend to
every descriptor, Ballast decides all descriptors of a request in one store call with
sliding windows: either every enforced descriptor has room and all are counted, or none is;
each descriptor counts its own hits (its `hits_addend`, else the request's, else 1).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

from services.limiter.envoy_config import UNIT_MS, EnvoyConfig, EnvoyLimit
from services.limiter.store.base import Kind, LimitOp, Store


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


@dataclass
class EnvoyStats:
    """Per-limit counters in envoyproxy/ratelimit's spirit (keys are the limits' full keys)."""

    total_hits: Counter[str] = field(default_factory=Counter)
    over_limit: Counter[str] = field(default_factory=Counter)
    near_limit: Counter[str] = field(default_factory=Counter)
    shadow_mode: Counter[str] = field(default_factory=Counter)


class EnvoyLimiter:
    def __init__(
        self, store: Store, config: Callable[[], EnvoyConfig | None], *, near_ratio: float = 0.8
    ) -> None:
        self.store = store
        self.config = config
        self.near_ratio = near_ratio
        self.stats = EnvoyStats()

    def _limits(self, domain: str, descriptors: Sequence[Descriptor]) -> list[EnvoyLimit | None]:
        config = self.config()
        if config is None or domain not in config.domains:
            return [None] * len(descriptors)
        limits: list[EnvoyLimit | None] = []
        for d in descriptors:
            if d.override is not None and d.override[1] in UNIT_MS:
                key = domain + "." + ".".join(f"{k}_{v}" if v else k for k, v in d.entries)
                limits.append(EnvoyLimit(key, d.override[0], d.override[1]))
            else:
                limits.append(config.find(domain, d.entries))
        replaced = {name for lim in limits if lim is not None for name in lim.replaces}
        return [None if lim is not None and lim.name and lim.name in replaced else lim for lim in limits]

    async def should_rate_limit(
        self, domain: str, descriptors: Sequence[Descriptor]
    ) -> tuple[bool, list[DescriptorVerdict]]:
        """(over limit overall, one verdict per descriptor)."""
        limits = self._limits(domain, descriptors)
        tag = "{rls:" + _q(domain) + "}"
        ops: list[LimitOp] = []
        # descriptor index -> op index; identical descriptors of one request share one counter
        # (their hits add up), so a duplicate cannot slip past the limit within the same call.
        op_of: dict[int, int] = {}
        by_key: dict[str, int] = {}
        for i, (d, lim) in enumerate(zip(descriptors, limits, strict=True)):
            if lim is None or lim.unlimited:
                continue
            path = ".".join(f"{_q(k)}_{_q(v)}" for k, v in d.entries)
            key = f"{tag}:{path}:{lim.window_ms}"
            if key in by_key:
                j = by_key[key]
                ops[j] = LimitOp(
                    Kind.WINDOW, key, ops[j].limit, ops[j].cost + d.hits, lim.window_ms, ops[j].shadow
                )
            else:
                by_key[key] = len(ops)
                ops.append(
                    LimitOp(Kind.WINDOW, key, lim.requests_per_unit, d.hits, lim.window_ms, lim.shadow)
                )
            op_of[i] = by_key[key]
        verdicts = [DescriptorVerdict(False, lim) for lim in limits]
        if not ops:
            return False, verdicts
        outcome = await self.store.decide(ops)
        over_all = False
        for i, j in op_of.items():
            lim, op, r = limits[i], ops[j], outcome.results[j]
            assert lim is not None
            over = r.over and not op.shadow
            verdicts[i] = DescriptorVerdict(over, lim, r.remaining, r.retry_ms if r.over else r.reset_ms)
            self._count(descriptors[i], lim, op, r.over, r.remaining)
            over_all = over_all or over
        return over_all, verdicts

    def _count(self, d: Descriptor, lim: EnvoyLimit, op: LimitOp, over: bool, remaining: int) -> None:
        key = lim.full_key
        if lim.detailed_metric and d.entries:
            key = f"{key}_{d.entries[-1][1]}"
        s = self.stats
        s.total_hits[key] += op.cost
        if over:
            (s.shadow_mode if op.shadow else s.over_limit)[key] += op.cost
        elif op.limit > 0 and remaining <= op.limit * (1 - self.near_ratio):
            s.near_limit[key] += op.cost
