"""The limiter's counters as OpenTelemetry metrics: decisions by outcome, limits hit or near.

The domain keeps plain counters (no telemetry imports there); these observable instruments
read them at each collection. Labels are the configured limit names and decision reasons,
so cardinality is bounded by the tiers file, not by users; the tenant budget gauge names at most
BALLAST_METRICS_MAX_TENANTS tenants per replica (the rest as `(other)`); the Envoy statistics are labelled by
the config's limit keys, which grow with request values only where the config asks for it
(`detailed_metric`, `value_to_metric`), as upstream warns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from services.limiter.envoy import EnvoyLimiter
from services.limiter.limiter import Limiter
from services.limiter.tiers import REQUESTS, TENANT_TOKENS, TOOL_CALLS, USER_TOKENS


def _from(
    counter: Callable[[], Counter[str]], label: str
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(value, {label: key}) for key, value in counter().items()]

    return observe


def register(meter: metrics.Meter, limiter: Limiter, envoy: EnvoyLimiter) -> None:
    def decisions(options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(count, {"decision": str(decision), "reason": reason or "none"})
            for (decision, reason), count in limiter.stats.decisions.items()
        ]

    def degraded(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(limiter.stats.degraded)]

    def limits(options: CallbackOptions) -> Iterable[Observation]:
        # The tiers file as a gauge (it reloads live): dashboards and alerts set usage against it.
        for tier in limiter.tiers.current.tiers.values():
            configured = (
                (REQUESTS, tier.requests),
                (USER_TOKENS, tier.user_tokens),
                (TENANT_TOKENS, tier.tenant_tokens),
                (TOOL_CALLS, tier.tool_calls),
            )
            for name, limit in configured:
                if not limit.unlimited:
                    yield Observation(limit.limit, {"tier": tier.name, "limit": name})

    def budget_used(options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(used, {"tenant": tenant, "tier": tier})
            for (tenant, tier), used in limiter.stats.budget_used(limiter.clock()).items()
        ]

    meter.create_observable_gauge(
        "ballast.limiter.tenant_budget_used_ratio",
        callbacks=[budget_used],
        description="Share of each tenant's daily token budget (tenant_tokens_per_day) spent, as this replica last saw it; gone once the day resets",
    )
    meter.create_observable_gauge(
        "ballast.limiter.near_limit_ratio",
        callbacks=[lambda options: [Observation(limiter.tiers.current.near_limit_ratio)]],
        description="The tiers file's near_limit_ratio: the share of a limit past which it counts as near",
    )
    meter.create_observable_gauge(
        "ballast.limiter.configured_limit",
        callbacks=[limits],
        description="Each tier's configured limits (requests per window, tokens per day, tool calls); unlimited ones are absent",
    )
    meter.create_observable_counter(
        "ballast.limiter.decisions",
        callbacks=[decisions],
        unit="{decision}",
        description="Check decisions by outcome (allow, delay, deny) and the limit that decided",
    )
    meter.create_observable_counter(
        "ballast.limiter.over_limit",
        callbacks=[_from(lambda: limiter.stats.over_limit, "limit")],
        unit="{check}",
        description="Checks that found a limit exhausted, by limit",
    )
    meter.create_observable_counter(
        "ballast.limiter.near_limit",
        callbacks=[_from(lambda: limiter.stats.near_limit, "limit")],
        unit="{check}",
        description="Checks that left a limit past its near-limit ratio, by limit",
    )
    meter.create_observable_counter(
        "ballast.limiter.shadow_over_limit",
        callbacks=[_from(lambda: limiter.stats.shadow_over, "limit")],
        unit="{check}",
        description="Checks a shadow-mode limit would have denied",
    )
    meter.create_observable_counter(
        "ballast.limiter.degraded_decisions",
        callbacks=[degraded],
        unit="{decision}",
        description="Decisions made without the shared store (fail mode during an outage)",
    )
    # envoyproxy/ratelimit's statistics under its names (its statsd names are
    # ratelimit.service.rate_limit.<domain>.<key>.<stat>; the Prometheus mapping it ships makes
    # them ratelimit_service_rate_limit_<stat>{domain, key}), so its dashboards keep working.
    for stat, description in (
        ("total_hits", "Envoy hits per configured limit"),
        ("over_limit", "Envoy hits over their limit"),
        ("near_limit", "Envoy hits past the near-limit ratio, within the limit"),
        ("within_limit", "Envoy hits within their limit"),
        ("shadow_mode", "Envoy hits over a shadow-mode limit (answered OK)"),
    ):
        meter.create_observable_counter(
            f"ratelimit.service.rate_limit.{stat}",
            callbacks=[_envoy(envoy, stat)],
            unit="{hit}",
            description=description,
        )


def _envoy(envoy: EnvoyLimiter, stat: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        counter: Counter[tuple[str, str]] = getattr(envoy.stats, stat)
        return [Observation(value, {"domain": d, "key": k}) for (d, k), value in counter.items()]

    return observe
