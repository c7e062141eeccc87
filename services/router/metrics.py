"""The router's metrics: attempts by outcome, provider call duration, tokens and cost per model,
and breaker state, EWMA latency and headroom per provider+model (what dashboards and alerts watch).

Names follow the OpenTelemetry GenAI conventions where one exists (`gen_ai.client.*`); labels stay
bounded (provider, model, outcome, token type).
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from services.router.health import BreakerState, HealthBook
from services.router.model import Usage
from services.router.pricing import Cost
from services.router.providers.base import Outcome

_BREAKER_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class RouterMetrics:
    def __init__(self, meter: metrics.Meter, health: HealthBook) -> None:
        self._health = health
        self._attempts = meter.create_counter(
            "ballast.router.attempts", unit="{attempt}", description="Provider attempts by outcome"
        )
        self._duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="Duration of provider calls"
        )
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens per provider call, by type"
        )
        self._first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk",
            unit="s",
            description="Time from the request to the first streamed chunk of a provider call",
        )
        self._cost = meter.create_counter(
            "ballast.router.cost", unit="{microdollar}", description="Cost of answered calls in micro-dollars"
        )
        self._estimated = meter.create_counter(
            "ballast.router.usage.estimated",
            unit="{call}",
            description="Answered calls whose provider reported no usage (counted with the model's tokenizer)",
        )
        self._removals = meter.create_counter(
            "ballast.router.provider.removals",
            unit="{removal}",
            description="Times a provider was taken out of rotation (refused key, out of credit), by reason",
        )
        meter.create_observable_gauge(
            "ballast.router.provider.out_of_rotation",
            callbacks=[self._observe_rotation],
            description="1 while a provider is out of rotation (label reason), until a probe succeeds",
        )
        meter.create_observable_gauge(
            "ballast.router.breaker.state",
            callbacks=[self._observe_breakers],
            description="Circuit breaker per provider and model: 0 closed, 1 half-open, 2 open",
        )
        meter.create_observable_gauge(
            "ballast.router.ewma_latency",
            callbacks=[self._observe_latency],
            unit="s",
            description="Recent (EWMA) latency per provider and model",
        )
        meter.create_observable_gauge(
            "ballast.router.headroom.remaining_requests",
            callbacks=[self._observe_requests],
            unit="{request}",
            description="Requests left in the provider's rate-limit window, as last reported",
        )
        meter.create_observable_gauge(
            "ballast.router.headroom.remaining_tokens",
            callbacks=[self._observe_tokens],
            unit="{token}",
            description="Tokens left in the provider's rate-limit window, as last reported",
        )

    def attempt(self, operation: str, provider: str, model: str, outcome: Outcome, latency: float) -> None:
        labels = {"provider": provider, "model": model, "outcome": outcome.value}
        self._attempts.add(1, labels)
        if outcome is not Outcome.BREAKER_OPEN:
            attributes = {
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": provider,
                "gen_ai.request.model": model,
            }
            if outcome is not Outcome.OK:
                attributes["error.type"] = outcome.value
            self._duration.record(latency, attributes)

    def first_token(self, operation: str, provider: str, model: str, seconds: float) -> None:
        self._first_chunk.record(
            seconds,
            {
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": provider,
                "gen_ai.request.model": model,
            },
        )

    def answered(self, operation: str, provider: str, model: str, usage: Usage, cost: Cost) -> None:
        base = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": provider,
            "gen_ai.request.model": model,
        }
        # Estimated counts (the provider reported none) carry the flag, so dashboards can tell
        # measured from counted-by-tokenizer.
        estimated = "true" if usage.estimated else "false"
        base["ballast.usage.estimated"] = estimated
        self._tokens.record(usage.input_tokens, {**base, "gen_ai.token.type": "input"})
        if operation == "chat":
            self._tokens.record(usage.output_tokens, {**base, "gen_ai.token.type": "output"})
        labels = {"provider": provider, "model": model}
        self._cost.add(cost.total_micros, {**labels, "estimated": estimated})
        if usage.estimated:
            self._estimated.add(1, {**labels, "operation": operation})

    def out_of_rotation(self, provider: str, reason: str) -> None:
        self._removals.add(1, {"provider": provider, "reason": reason})

    def _observe_rotation(self, options: CallbackOptions) -> Iterable[Observation]:
        for removal in list(self._health.removed.values()):
            yield Observation(1, {"provider": removal.provider, "reason": removal.reason})

    def _observe_breakers(self, options: CallbackOptions) -> Iterable[Observation]:
        for health in self._health.all():
            state = self._health.state((health.provider, health.model))
            yield Observation(_BREAKER_VALUE[state], {"provider": health.provider, "model": health.model})

    def _observe_latency(self, options: CallbackOptions) -> Iterable[Observation]:
        for health in self._health.all():
            if health.ewma_latency is not None:
                yield Observation(health.ewma_latency, {"provider": health.provider, "model": health.model})

    def _observe_requests(self, options: CallbackOptions) -> Iterable[Observation]:
        for health in self._health.all():
            if health.headroom.remaining_requests >= 0:
                yield Observation(
                    health.headroom.remaining_requests, {"provider": health.provider, "model": health.model}
                )

    def _observe_tokens(self, options: CallbackOptions) -> Iterable[Observation]:
        for health in self._health.all():
            if health.headroom.remaining_tokens >= 0:
                yield Observation(
                    health.headroom.remaining_tokens, {"provider": health.provider, "model": health.model}
                )
