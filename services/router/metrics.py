"""The router's metrics: attempts by outcome, provider call duration, tokens and cost per model,
and breaker state, EWMA latency and headroom per provider+model (what dashboards and alerts watch).

Names follow the OpenTelemetry GenAI conventions where one exists (`gen_ai.client.*`); labels stay
bounded (provider, model, outcome, token type).

Every provider call is counted here, so the counters are tallied in plain dicts and reported by
observable counters when a reader collects (the same cumulative sums a Counter would report):
an OpenTelemetry SDK measurement costs several microseconds (a Measurement, its attributes
cleaned, copied and hashed), a dict increment a fraction of one. Histograms have no observable
form; their attribute sets are built once per label combination.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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
        # (provider, model, outcome) -> attempts; (provider, model, estimated) -> micro-dollars;
        # (provider, model, operation) -> calls with estimated usage.
        self._attempt_counts: dict[tuple[str, str, str], int] = {}
        self._cost_sums: dict[tuple[str, str, str], int] = {}
        self._estimated_counts: dict[tuple[str, str, str], int] = {}
        # Attribute sets of the histograms, per label combination (bounded like the labels).
        self._duration_labels: dict[tuple[str, str, str, Outcome], dict[str, Any]] = {}
        self._token_labels: dict[tuple[str, str, str, str], tuple[dict[str, Any], dict[str, Any]]] = {}
        meter.create_observable_counter(
            "ballast.router.attempts",
            callbacks=[self._observe_attempts],
            unit="{attempt}",
            description="Provider attempts by outcome",
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
        meter.create_observable_counter(
            "ballast.router.cost",
            callbacks=[self._observe_cost],
            unit="{microdollar}",
            description="Cost of answered calls in micro-dollars",
        )
        meter.create_observable_counter(
            "ballast.router.usage.estimated",
            callbacks=[self._observe_estimated],
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
        counted = (provider, model, outcome.value)
        self._attempt_counts[counted] = self._attempt_counts.get(counted, 0) + 1
        if outcome is not Outcome.BREAKER_OPEN:
            key = (operation, provider, model, outcome)
            attributes = self._duration_labels.get(key)
            if attributes is None:
                attributes = {
                    "gen_ai.operation.name": operation,
                    "gen_ai.provider.name": provider,
                    "gen_ai.request.model": model,
                }
                if outcome is not Outcome.OK:
                    attributes["error.type"] = outcome.value
                self._duration_labels[key] = attributes
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
        # Estimated counts (the provider reported none) carry the flag, so dashboards can tell
        # measured from counted-by-tokenizer.
        estimated = "true" if usage.estimated else "false"
        key = (operation, provider, model, estimated)
        labels = self._token_labels.get(key)
        if labels is None:
            base = {
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": provider,
                "gen_ai.request.model": model,
                "ballast.usage.estimated": estimated,
            }
            labels = self._token_labels[key] = (
                {**base, "gen_ai.token.type": "input"},
                {**base, "gen_ai.token.type": "output"},
            )
        self._tokens.record(usage.input_tokens, labels[0])
        if operation == "chat":
            self._tokens.record(usage.output_tokens, labels[1])
        costed = (provider, model, estimated)
        self._cost_sums[costed] = self._cost_sums.get(costed, 0) + cost.total_micros
        if usage.estimated:
            flagged = (provider, model, operation)
            self._estimated_counts[flagged] = self._estimated_counts.get(flagged, 0) + 1

    def out_of_rotation(self, provider: str, reason: str) -> None:
        self._removals.add(1, {"provider": provider, "reason": reason})

    # Collection runs on the reader's thread: list() copies a dict in one step under the GIL.
    def _observe_attempts(self, options: CallbackOptions) -> Iterable[Observation]:
        for (provider, model, outcome), count in list(self._attempt_counts.items()):
            yield Observation(count, {"provider": provider, "model": model, "outcome": outcome})

    def _observe_cost(self, options: CallbackOptions) -> Iterable[Observation]:
        for (provider, model, estimated), micros in list(self._cost_sums.items()):
            yield Observation(micros, {"provider": provider, "model": model, "estimated": estimated})

    def _observe_estimated(self, options: CallbackOptions) -> Iterable[Observation]:
        for (provider, model, operation), count in list(self._estimated_counts.items()):
            yield Observation(count, {"provider": provider, "model": model, "operation": operation})

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
