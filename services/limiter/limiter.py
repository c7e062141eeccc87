"""The limiter's decisions: tier limits, token budgets, tool-call caps and throttling.

Turns a request into store operations (one per limit it touches), asks the store to decide
them atomically, and adds the throttling verdict from provider headroom. No gRPC here.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote

from services.kit.errors import InvalidArgument
from services.kit.labels import BoundedLabel
from services.limiter.store.base import (
    BudgetRef,
    Kind,
    LimitOp,
    OpResult,
    Outcome,
    Store,
)
from services.limiter.throttle import (
    ALLOW,
    UNKNOWN_HEADROOM,
    HeadroomBoard,
    HeadroomReport,
    headroom_fraction,
    judge,
)
from services.limiter.tiers import (
    REQUESTS,
    TENANT_TOKENS,
    TOOL_CALLS,
    USER_TOKENS,
    Limit,
    Tier,
    TiersConfig,
)

log = logging.getLogger("ballast.limiter")

ALLOWED, DELAYED, DENIED = "allow", "delay", "deny"
PROVIDER_HEADROOM = "provider_headroom"
STORE_UNAVAILABLE = "store_unavailable"


def _q(value: str) -> str:
    # Ids go into keys escaped, so no id can forge another key or break the {hash tag}. Plain ids
    # (the usual case) need no escaping, and quote() costs more than the check.
    return value if _PLAIN.fullmatch(value) else quote(value, safe="")


_PLAIN = re.compile(r"[A-Za-z0-9_.~-]*")

# Reservation ids: a random prefix per process and a counter. Unique across replicas and
# restarts like a uuid4, without reading the OS's random source on every Check.
_RESERVATION_PREFIX = secrets.token_hex(8)
_reservation_counter = itertools.count(1)


def new_reservation_id() -> str:
    return f"{_RESERVATION_PREFIX}{next(_reservation_counter):016x}"


# The values built for every Check (input, plan, per-limit states, result) are slotted
# dataclasses, not frozen ones, and are never changed once built: a frozen dataclass sets each
# field through object.__setattr__, which costs four times as much, and a three-limit Check builds
# about fifteen of them (10 µs of its CPU, about 6% of decisions/s in an A/B benchmark run).
@dataclass(slots=True)
class CheckInput:
    tenant: str
    user: str
    tier: str
    session_id: str = ""
    requests: int = 0
    reserve_tokens: int = 0
    tool_calls: int = 0
    # One of PRIORITIES, or "" for the tier's priority.
    priority: str = ""
    provider: str = ""
    request_id: str = ""


@dataclass(slots=True)
class LimitState:
    name: str
    limit: int
    remaining: int
    reset_after: float
    unlimited: bool = False
    over: bool = False
    shadow: bool = False


@dataclass(slots=True)
class CheckResult:
    decision: str
    limits: tuple[LimitState, ...]
    priority: str
    delay: float = 0.0
    retry_after: float = 0.0
    reason: str = ""
    reservation_id: str = ""
    degraded: bool = False
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class CommitResult:
    budgets: tuple[LimitState, ...]
    reservation_found: bool
    already_settled: bool
    degraded: bool


@dataclass(frozen=True, slots=True)
class UsageResult:
    quotas: tuple[LimitState, ...]
    tokens_today: int
    cost_micros_today: int


@dataclass
class Stats:
    """Counters for metrics (exported by the telemetry layer, not here)."""

    decisions: Counter[tuple[str, str]] = field(default_factory=Counter)
    over_limit: Counter[str] = field(default_factory=Counter)
    near_limit: Counter[str] = field(default_factory=Counter)
    shadow_over: Counter[str] = field(default_factory=Counter)
    degraded: int = 0
    replayed: int = 0
    # (tenant label, tier) -> (limit, remaining, reset at): the tenant's daily token budget as
    # last seen by a Check or Commit here. Tenants past the label's bound share one entry.
    tenant_budgets: dict[tuple[str, str], tuple[int, int, float]] = field(default_factory=dict)
    tenant: BoundedLabel = field(default_factory=lambda: BoundedLabel(1000))

    def saw_tenant_budget(self, tenant: str, tier: str, state: LimitState, now: float) -> None:
        if not state.unlimited and state.limit > 0:
            self.tenant_budgets[(self.tenant(tenant), tier)] = (
                state.limit,
                state.remaining,
                now + state.reset_after,
            )

    def budget_used(self, now: float) -> dict[tuple[str, str], float]:
        """Share of each tenant's daily token budget spent (0..1); budgets whose day has ended since
        they were seen are forgotten."""
        used: dict[tuple[str, str], float] = {}
        for key, (limit, remaining, reset_at) in list(self.tenant_budgets.items()):
            if now >= reset_at:
                del self.tenant_budgets[key]
                continue
            used[key] = min(1.0, max(0.0, (limit - remaining) / limit))
        return used


@dataclass(slots=True)
class _Planned:
    name: str
    spec: Limit
    op: LimitOp | None


class TiersSource(Protocol):
    """Anything holding the current tiers configuration (reloaded in the background)."""

    @property
    def current(self) -> TiersConfig: ...


class StaticTiers:
    def __init__(self, config: TiersConfig) -> None:
        self._config = config

    @property
    def current(self) -> TiersConfig:
        return self._config

    def set(self, config: TiersConfig) -> None:
        self._config = config


class Limiter:
    def __init__(
        self,
        store: Store,
        tiers: TiersSource,
        *,
        clock: Callable[[], float] = time.time,
        window_buckets: int = 20,
        idempotency_ttl: float = 600.0,
        max_tenants: int = 1000,
    ) -> None:
        self.store = store
        self.tiers = tiers
        self.clock = clock
        self.window_buckets = window_buckets
        self.idempotency_ttl = idempotency_ttl
        self.board = HeadroomBoard()
        # Metrics name at most `max_tenants` tenants (BALLAST_METRICS_MAX_TENANTS), the rest `(other)`.
        self.stats = Stats(tenant=BoundedLabel(max_tenants))

    # -- keys -------------------------------------------------------------------------------

    @staticmethod
    def _tag(tenant: str) -> str:
        # Every key of one Check carries the tenant's hash tag, so a Check is one slot in a
        # Redis Cluster and one Lua call decides user, tenant and session limits together.
        return "{t:" + _q(tenant) + "}"

    def _tier(self, config: TiersConfig, name: str) -> Tier:
        tier = config.tier(name)
        if tier is None:
            known = ", ".join(sorted(config.tiers))
            raise InvalidArgument("caller.tier", f"unknown tier {name!r} (known: {known})")
        return tier

    def _plan(
        self, config: TiersConfig, tier: Tier, req: CheckInput, *, everything: bool = False
    ) -> list[_Planned]:
        tag = self._tag(req.tenant)
        user = f"{tag}:u:{_q(req.user)}"
        plan: list[_Planned] = []
        if req.requests > 0 or everything:
            spec = tier.requests
            op = None
            if not spec.unlimited:
                window_ms = max(1, int(spec.window * 1000))
                key = f"{user}:rq:{window_ms}:{self.window_buckets}"
                op = LimitOp(Kind.WINDOW, key, spec.limit, req.requests, window_ms, spec.shadow)
            plan.append(_Planned(REQUESTS, spec, op))
        if req.reserve_tokens > 0 or everything:
            for name, spec, key in (
                (USER_TOKENS, tier.user_tokens, f"{user}:tok"),
                (TENANT_TOKENS, tier.tenant_tokens, f"{tag}:tok"),
            ):
                limit = -1 if spec.unlimited else spec.limit
                op = LimitOp(Kind.BUDGET, key, limit, req.reserve_tokens, 0, spec.shadow)
                plan.append(_Planned(name, spec, op))
        if req.tool_calls > 0 or (everything and req.session_id):
            spec = tier.tool_calls
            key = f"{tag}:s:{_q(req.session_id)}:tc"
            ttl_ms = max(1, int(config.session_ttl * 1000))
            limit = -1 if spec.unlimited else spec.limit
            op = LimitOp(Kind.COUNTER, key, limit, req.tool_calls, ttl_ms, spec.shadow)
            plan.append(_Planned(TOOL_CALLS, spec, op))
        return plan

    # -- Check ----------------------------------------------------------------------------

    async def check(self, req: CheckInput) -> CheckResult:
        config = self.tiers.current
        tier = self._tier(config, req.tier)
        priority = req.priority or tier.priority
        plan = self._plan(config, tier, req)
        ops = [p.op for p in plan if p.op is not None]
        verdict = ALLOW
        if req.requests > 0 or req.reserve_tokens > 0:
            verdict = judge(config.throttle, priority, self.board.headroom(req.provider, self.clock()))
        reservation_id = new_reservation_id() if req.reserve_tokens > 0 else ""
        delay_ms = int(verdict.seconds * 1000) if verdict.action == DELAYED else 0
        if ops:
            idem_key = ""
            if req.request_id:
                # The request's shape is part of the key: a chat Check and a tool-call Check that
                # happen to share an id are different requests, not retries of each other.
                shape = f"{req.requests}:{req.tool_calls}:{_q(req.session_id)}"
                idem_key = f"{self._tag(req.tenant)}:u:{_q(req.user)}:idem:{_q(req.request_id)}:{shape}"
            outcome = await self.store.decide(
                ops,
                peek=verdict.action == DENIED,
                idempotency_key=idem_key,
                idempotency_ttl_ms=int(self.idempotency_ttl * 1000),
                reservation_id=reservation_id,
                reservation_ttl_ms=max(1, int(config.reservation_ttl * 1000)),
                delay_ms=delay_ms,
            )
        else:
            outcome = Outcome(verdict.action != DENIED, (), delay_ms=delay_ms)
        result = self._result(config, plan, outcome, verdict.action, verdict.seconds, priority)
        self._count(config, plan, outcome, result, req)
        return result

    def _result(
        self,
        config: TiersConfig,
        plan: list[_Planned],
        outcome: Outcome,
        throttle: str,
        throttle_s: float,
        priority: str,
    ) -> CheckResult:
        limits = self._states(plan, outcome.results)

        def make(decision: str, *, delay: float = 0.0, retry: float = 0.0, reason: str = "") -> CheckResult:
            rid = outcome.reservation_id if outcome.admitted else ""
            return CheckResult(
                decision, limits, priority, delay, retry, reason, rid, outcome.degraded, outcome.replayed
            )

        if outcome.admitted:
            if outcome.delay_ms > 0:
                return make(DELAYED, delay=outcome.delay_ms / 1000, reason=PROVIDER_HEADROOM)
            return make(ALLOWED)
        decided = [p for p in plan if p.op is not None]
        enforced = [
            (r.retry_ms, p.name)
            for p, r in zip(decided, outcome.results, strict=True)
            if r.over and p.op is not None and not p.op.shadow
        ]
        if outcome.degraded and not enforced:
            return make(DENIED, retry=throttle_s or 1.0, reason=STORE_UNAVAILABLE)
        if enforced:
            retry_ms, name = max(enforced)
            return make(DENIED, retry=retry_ms / 1000, reason=name)
        return make(DENIED, retry=throttle_s, reason=PROVIDER_HEADROOM)

    @staticmethod
    def _states(plan: list[_Planned], results: tuple[OpResult, ...]) -> tuple[LimitState, ...]:
        out: list[LimitState] = []
        it = iter(results)
        for p in plan:
            if p.op is None:
                out.append(LimitState(p.name, 0, 0, 0.0, unlimited=True, shadow=p.spec.shadow))
                continue
            r = next(it, None)
            if r is None:  # the op was not decided (no results): report nothing known
                continue
            if p.spec.unlimited:
                out.append(LimitState(p.name, 0, 0, r.reset_ms / 1000, unlimited=True))
                continue
            out.append(
                LimitState(
                    p.name,
                    p.op.limit,
                    r.remaining,
                    r.reset_ms / 1000,
                    over=r.over,
                    shadow=p.op.shadow,
                )
            )
        return tuple(out)

    def _count(
        self,
        config: TiersConfig,
        plan: list[_Planned],
        outcome: Outcome,
        result: CheckResult,
        req: CheckInput,
    ) -> None:
        s = self.stats
        s.decisions[(result.decision, result.reason)] += 1
        if outcome.degraded:
            s.degraded += 1
        if outcome.replayed:
            s.replayed += 1
        for state in result.limits:
            if state.unlimited:
                continue
            if state.name == TENANT_TOKENS:
                s.saw_tenant_budget(req.tenant, req.tier, state, self.clock())
            if state.over:
                (s.shadow_over if state.shadow else s.over_limit)[state.name] += 1
            elif state.limit > 0 and state.remaining <= state.limit * (1 - config.near_limit_ratio):
                s.near_limit[state.name] += 1

    # -- Commit ---------------------------------------------------------------------------

    def _budget_refs(self, tier: Tier, tenant: str, user: str) -> list[BudgetRef]:
        tag = self._tag(tenant)
        return [
            BudgetRef(
                f"{tag}:u:{_q(user)}:tok", -1 if tier.user_tokens.unlimited else tier.user_tokens.limit
            ),
            BudgetRef(f"{tag}:tok", -1 if tier.tenant_tokens.unlimited else tier.tenant_tokens.limit),
        ]

    async def commit(
        self,
        tenant: str,
        user: str,
        tier_name: str,
        reservation_id: str,
        actual_tokens: int,
        cost_micros: int,
    ) -> CommitResult:
        config = self.tiers.current
        tier = self._tier(config, tier_name)
        refs = self._budget_refs(tier, tenant, user)
        done_key = f"{self._tag(tenant)}:done:{_q(reservation_id)}" if reservation_id else ""
        settlement = await self.store.settle(
            refs,
            reservation_id=reservation_id,
            actual_tokens=actual_tokens,
            cost_micros=cost_micros,
            done_key=done_key,
            done_ttl_ms=int((config.reservation_ttl + self.idempotency_ttl) * 1000),
        )
        budgets = tuple(
            LimitState(
                name, 0 if spec.unlimited else spec.limit, r.remaining, r.reset_ms / 1000, spec.unlimited
            )
            for (name, spec), r in zip(
                ((USER_TOKENS, tier.user_tokens), (TENANT_TOKENS, tier.tenant_tokens)),
                settlement.results,
                strict=False,
            )
        )
        for state in budgets:
            if state.name == TENANT_TOKENS:
                self.stats.saw_tenant_budget(tenant, tier_name, state, self.clock())
        return CommitResult(
            budgets, settlement.reservation_found, settlement.already_settled, settlement.degraded
        )

    # -- GetUsage -------------------------------------------------------------------------

    async def usage(self, tenant: str, user: str, tier_name: str, session_id: str) -> UsageResult:
        config = self.tiers.current
        tier = self._tier(config, tier_name)
        req = CheckInput(tenant, user, tier_name, session_id=session_id)
        plan = self._plan(config, tier, req, everything=True)
        ops = [p.op for p in plan if p.op is not None]
        outcome = await self.store.decide(ops, peek=True) if ops else Outcome(False, ())
        states = self._states(plan, outcome.results)
        tokens = cost = 0
        for p, r in zip([p for p in plan if p.op is not None], outcome.results, strict=True):
            if p.name == USER_TOKENS:
                tokens, cost = r.used, r.cost_micros
        return UsageResult(states, tokens, cost)

    # -- headroom -------------------------------------------------------------------------

    async def report_headroom(
        self,
        provider: str,
        model: str,
        *,
        remaining_requests: int,
        remaining_tokens: int,
        limit_requests: int,
        limit_tokens: int,
        reset_requests: float,
        reset_tokens: float,
        rate_limited: bool,
        retry_after: float,
    ) -> None:
        policy = self.tiers.current.throttle
        now = self.clock()
        full_at = 0.0
        if rate_limited:
            fraction: float | None = 0.0
            horizon = retry_after if retry_after > 0 else policy.stale_after
        else:
            fraction = headroom_fraction(remaining_requests, limit_requests, remaining_tokens, limit_tokens)
            resets = [s for s in (reset_requests, reset_tokens) if s > 0]
            horizon = max(resets) if resets else policy.stale_after
            if resets:
                full_at = now + max(resets)
        if fraction is None:
            if retry_after <= 0:
                return  # no figures and no horizon: nothing to go on
            # No figures but a horizon: the provider's headroom is unknown until then (the
            # router's breaker for it opened). It replaces what was known and is left out of
            # judgements, so the providers that can take traffic decide.
            fraction, horizon = UNKNOWN_HEADROOM, retry_after
        horizon = min(horizon, policy.stale_after)
        report = HeadroomReport(provider, model, fraction, now + horizon, rate_limited, now, full_at)
        self.board.update(report)
        await self.store.put_headroom(f"{provider}\x00{model}", report.encode(), max(1, int(horizon * 1000)))

    async def refresh_headroom(self) -> None:
        """Adds the reports other replicas received (shared through the store) to this one's view."""
        raw = await self.store.get_headroom()
        reports = [r for r in (HeadroomReport.decode(v) for v in raw.values()) if r is not None]
        self.board.merge(reports, self.clock())
