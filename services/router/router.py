"""The gateway: runs one request through its plan with timeouts, retries, failover and breakers.

Rules (the README explains them for operators):
- every attempt has a timeout from the caller's deadline: half of what is left while another
  candidate could follow, all of it on the last one, never more than the attempt cap;
- 429, 5xx, timeouts, connection and protocol errors fail over to the next candidate; when
  every candidate failed, another round starts after a jittered exponential backoff that is at
  least the largest retry-after a provider asked for (within the deadline and max_retry_after);
- the caller's own 4xx mistakes are never retried: the provider's message comes back as
  INVALID_ARGUMENT;
- a candidate whose breaker is open is skipped at no cost and shows in the trail;
- streams fail over only before the first content; a stream that breaks later ends with
  UNAVAILABLE, never with a clean finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

from opentelemetry import trace

from services.kit.errors import (
    BallastError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from services.router.catalog import Model
from services.router.config import RouterSettings
from services.router.health import HealthBook
from services.router.metrics import RouterMetrics
from services.router.model import ChatRequest, ChatResult, Delta, EmbedResult, Usage
from services.router.pricing import Cost, cost_of
from services.router.providers.base import Adapter, Headroom, Outcome, ProviderError
from services.router.routing import Choice, Hints, Plan, Planner

log = logging.getLogger("ballast.router.gateway")
T = TypeVar("T")

# Below this much time left, an attempt is not worth starting.
MIN_ATTEMPT_TIME = 0.005
# Latency samples a target needs before stall detection trusts its EWMA.
STALL_MIN_SAMPLES = 5


@dataclass(frozen=True)
class AttemptRecord:
    provider: str
    model: str
    outcome: Outcome
    http_status: int = 0
    latency: float = 0.0
    error: str = ""


@dataclass
class Answer:
    result: ChatResult
    choice: Choice
    attempts: list[AttemptRecord]
    cost: Cost
    latency: float


@dataclass
class Embedded:
    result: EmbedResult
    choice: Choice
    attempts: list[AttemptRecord]
    cost: Cost


@dataclass(frozen=True)
class StreamStarted:
    choice: Choice
    simulated: bool


@dataclass
class Call:
    """One request's routing inputs."""

    model: str = ""
    tier: str = ""
    region: str = ""
    hints: Hints = field(default_factory=Hints)
    # Absolute time on the gateway's clock by which the answer is due.
    deadline: float = 0.0
    request_id: str = ""
    # High and critical priority may use a provider's reserved last share of headroom.
    high_priority: bool = False


HeadroomListener = Callable[[str, str, Headroom], None]


class Gateway:
    def __init__(
        self,
        settings: RouterSettings,
        planner: Planner,
        health: HealthBook,
        adapters: Mapping[str, Adapter],
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        tracer: trace.Tracer | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.planner = planner
        self.health = health
        self.adapters: dict[str, Adapter] = dict(adapters)
        self.listeners: list[HeadroomListener] = []
        self.clock = clock
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.tracer = tracer or trace.NoOpTracer()
        self.metrics = metrics

    # --- shared attempt loop ---------------------------------------------------------------------

    def _timeout_for(
        self, call: Call, more_to_come: bool, target: tuple[str, str] | None = None, kind: str = "call"
    ) -> float:
        timeouts = self.settings.timeouts
        remaining = call.deadline - self.clock()
        share = remaining / 2 if more_to_come else remaining
        timeout = min(timeouts.attempt, share)
        if more_to_come and target is not None and timeouts.stall_factor > 0:
            # A target that usually answers in L seconds and has not after stall_factor x L is
            # more likely hung than slow: give the fallback the time instead.
            health = self.health.get(target)
            if health.samples_by_kind.get(kind, 0) >= STALL_MIN_SAMPLES:
                stall = max(timeouts.stall_floor, timeouts.stall_factor * health.ewma_by_kind[kind])
                timeout = min(timeout, stall)
        return timeout

    def _backoff(self, round_: int, errors: list[ProviderError]) -> float:
        retry = self.settings.retry
        ceiling = min(retry.backoff_max, retry.backoff_base * (2**round_))
        wait = self.rng.uniform(ceiling / 2, ceiling)
        asked = [e.retry_after for e in errors if e.retry_after is not None]
        return max([wait, *asked])

    def _failure(
        self, call: Call, plan: Plan, attempts: list[AttemptRecord], errors: list[ProviderError]
    ) -> BallastError:
        trail = "; ".join(
            f"{a.provider}/{a.model}: {a.outcome.value}" + (f" ({a.error})" if a.error else "")
            for a in attempts
        )
        if not errors:
            return Unavailable(f"every candidate of {plan.resolved!r} has an open circuit breaker: {trail}")
        if self.clock() >= call.deadline - MIN_ATTEMPT_TIME and all(
            e.outcome is Outcome.TIMEOUT for e in errors[-1:]
        ):
            return DeadlineExceeded(f"the deadline passed before a provider answered: {trail}")
        if all(e.outcome is Outcome.RATE_LIMITED for e in errors):
            waits = [e.retry_after for e in errors if e.retry_after is not None]
            return ResourceExhausted(
                f"every provider of {plan.resolved!r} is rate limited: {trail}",
                retry_after=min(waits) if waits else 1.0,
                reason="PROVIDER_RATE_LIMITED",
            )
        if all(e.outcome is Outcome.CLIENT_ERROR for e in errors):
            return FailedPrecondition(
                f"every provider of {plan.resolved!r} refused the router's credentials or model: {trail}"
            )
        return Unavailable(f"no provider of {plan.resolved!r} could answer: {trail}")

    async def _run(
        self,
        call: Call,
        plan: Plan,
        operation: str,
        attempt: Callable[[Adapter, Choice], Awaitable[T]],
        *,
        end_span: bool = True,
        latency_kind: str = "call",
    ) -> tuple[T, Choice, list[AttemptRecord], trace.Span]:
        """Tries the plan's candidates; returns the first success and its still-open span if not end_span."""
        attempts: list[AttemptRecord] = []
        errors: list[ProviderError] = []
        max_attempts = call.hints.max_attempts or self.settings.retry.max_attempts
        made = 0
        round_ = 0
        while True:
            round_errors: list[ProviderError] = []
            progressed = False
            for position, choice in enumerate(plan.choices):
                if made >= max_attempts:
                    break
                target = choice.target
                if not self.health.acquire(target):
                    if round_ == 0:
                        attempts.append(AttemptRecord(*target, Outcome.BREAKER_OPEN, error="circuit open"))
                        self._count(operation, attempts[-1])
                    continue
                more = made + 1 < max_attempts and any(
                    self.health.available(c.target) for c in plan.choices[position + 1 :]
                )
                timeout = self._timeout_for(call, more, target, latency_kind)
                if timeout < MIN_ATTEMPT_TIME:
                    self.health.release(target)
                    raise DeadlineExceeded(
                        "the deadline passed before a provider answered"
                        + (
                            ": " + "; ".join(f"{a.provider}/{a.model}: {a.outcome.value}" for a in attempts)
                            if attempts
                            else ""
                        )
                    )
                made += 1
                progressed = True
                started = self.clock()
                address = urlsplit(choice.provider.base_url)
                span = self.tracer.start_span(
                    f"{operation} {choice.model.provider_model}",
                    kind=trace.SpanKind.CLIENT,
                    attributes={
                        "gen_ai.operation.name": operation,
                        "gen_ai.provider.name": choice.provider.kind,
                        "gen_ai.request.model": choice.model.provider_model,
                        "server.address": address.hostname or "",
                        "server.port": address.port or (443 if address.scheme == "https" else 80),
                        "ballast.router.provider": choice.provider.name,
                        "ballast.router.simulated": choice.provider.simulated,
                    },
                )
                try:
                    async with asyncio.timeout(timeout):
                        value = await attempt(self.adapters[choice.provider.name], choice)
                except TimeoutError:
                    error = ProviderError(Outcome.TIMEOUT, f"no answer within {timeout:.3f}s")
                except ProviderError as exc:
                    error = exc
                except BaseException:
                    self.health.release(target)
                    span.end()
                    raise
                else:
                    latency = self.clock() - started
                    self.health.success(target, latency, latency_kind)
                    if latency_kind == "first_token" and self.metrics is not None:
                        self.metrics.first_token(operation, choice.provider.name, choice.model.id, latency)
                    attempts.append(AttemptRecord(*target, Outcome.OK, 200, latency))
                    self._count(operation, attempts[-1])
                    annotate(span, value, choice)
                    if end_span:
                        span.end()
                    return value, choice, attempts, span
                latency = self.clock() - started
                span.set_attribute("error.type", error.outcome.value)
                span.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
                span.end()
                self.health.failure(target, error.outcome, latency, error.retry_after)
                attempts.append(
                    AttemptRecord(*target, error.outcome, error.http_status, latency, error.message)
                )
                self._count(operation, attempts[-1])
                log.info(
                    "attempt failed",
                    extra={
                        "provider": target[0],
                        "model": target[1],
                        "outcome": error.outcome.value,
                        "http_status": error.http_status,
                        "request_id": call.request_id,
                    },
                )
                if error.caller_fault:
                    raise InvalidArgument(
                        "messages", f"provider {choice.provider.name} rejected the request: {error.message}"
                    )
                round_errors.append(error)
                errors.append(error)
            if not progressed or made >= max_attempts:
                break
            round_ += 1
            wait = self._backoff(round_, round_errors)
            if (
                wait > self.settings.retry.max_retry_after
                or self.clock() + wait >= call.deadline - MIN_ATTEMPT_TIME
            ):
                break
            await self.sleep(wait)
        raise self._failure(call, plan, attempts, errors)

    def _count(self, operation: str, record: AttemptRecord) -> None:
        if self.metrics is not None:
            self.metrics.attempt(operation, record.provider, record.model, record.outcome, record.latency)

    def _answered(self, operation: str, choice: Choice, usage: Usage, cost: Cost) -> Cost:
        if self.metrics is not None:
            self.metrics.answered(operation, choice.provider.name, choice.model.id, usage, cost)
        return cost

    # --- operations -------------------------------------------------------------------------------

    def _chat_plan(self, call: Call, request: ChatRequest) -> Plan:
        return self.planner.plan(
            call.model,
            tier=call.tier,
            caller_region=call.region,
            hints=call.hints,
            request=request,
            high_priority=call.high_priority,
        )

    async def complete(self, call: Call, request: ChatRequest) -> Answer:
        started = self.clock()
        plan = self._chat_plan(call, request)

        async def attempt(adapter: Adapter, choice: Choice) -> ChatResult:
            return await adapter.complete(choice.model, request)

        result, choice, attempts, _ = await self._run(call, plan, "chat", attempt)
        cost = self._answered("chat", choice, result.usage, cost_of(choice.model, result.usage))
        return Answer(result, choice, attempts, cost, self.clock() - started)

    async def embed(self, call: Call, inputs: list[str]) -> Embedded:
        tokens = sum((len(t) + 3) // 4 for t in inputs)
        plan = self.planner.plan(
            call.model,
            tier=call.tier,
            caller_region=call.region,
            hints=call.hints,
            kind="embedding",
            input_tokens=tokens,
            high_priority=call.high_priority,
        )

        async def attempt(adapter: Adapter, choice: Choice) -> EmbedResult:
            return await adapter.embed(choice.model, inputs)

        result, choice, attempts, _ = await self._run(call, plan, "embeddings", attempt)
        cost = self._answered("embeddings", choice, result.usage, cost_of(choice.model, result.usage))
        return Embedded(result, choice, attempts, cost)

    async def stream(self, call: Call, request: ChatRequest) -> AsyncIterator[StreamStarted | Delta | Answer]:
        """StreamStarted, then deltas, then the Answer; failover happens only before StreamStarted."""
        started = self.clock()
        plan = self._chat_plan(call, request)
        timeouts = self.settings.timeouts
        holder: dict[str, AsyncIterator[Delta | ChatResult]] = {}

        async def first_event(adapter: Adapter, choice: Choice) -> Delta | ChatResult:
            events = adapter.stream(choice.model, request)
            holder["events"] = events
            try:
                async with asyncio.timeout(timeouts.first_token):
                    return await anext(events)
            except TimeoutError:
                raise ProviderError(
                    Outcome.TIMEOUT, f"no first token within {timeouts.first_token:.3f}s"
                ) from None
            except StopAsyncIteration:
                raise ProviderError(Outcome.PROTOCOL_ERROR, "the stream ended without an answer") from None
            except BaseException:
                await _close(events)
                raise

        first, choice, attempts, span = await self._run(
            call, plan, "chat", first_event, end_span=False, latency_kind="first_token"
        )
        events = holder["events"]
        target = choice.target
        # _run counted the first token as success; a later break is recorded as a failure below.
        item: Delta | ChatResult = first
        try:
            yield StreamStarted(choice, choice.provider.simulated)
            while not isinstance(item, ChatResult):
                yield item
                remaining = call.deadline - self.clock()
                if remaining <= 0:
                    raise ProviderError(Outcome.TIMEOUT, "the deadline passed mid-stream")
                try:
                    async with asyncio.timeout(min(timeouts.stream_idle, remaining)):
                        item = await anext(events)
                except TimeoutError:
                    raise ProviderError(Outcome.TIMEOUT, "the stream stalled") from None
                except StopAsyncIteration:
                    raise ProviderError(
                        Outcome.PROTOCOL_ERROR, "the stream ended without an answer"
                    ) from None
        except ProviderError as error:
            latency = self.clock() - started
            span.set_attribute("error.type", error.outcome.value)
            span.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
            self.health.failure(target, error.outcome, latency, error.retry_after)
            attempts[-1] = AttemptRecord(*target, error.outcome, error.http_status, latency, error.message)
            self._count("chat", attempts[-1])
            await _close(events)
            raise Unavailable(
                f"the stream from {target[0]}/{target[1]} broke after it had started: {error.message}"
            ) from None
        finally:
            await _close(events)
            if not isinstance(item, ChatResult):
                span.end()
        result = item
        annotate(span, result, choice)
        span.end()
        cost = self._answered("chat", choice, result.usage, cost_of(choice.model, result.usage))
        yield Answer(result, choice, attempts, cost, self.clock() - started)

    def observe(self, provider: str) -> Callable[[Model, int, Headroom | None], None]:
        """The adapter's headers sink for `provider`: keeps headroom and tells the listeners."""

        def sink(model: Model, status: int, headroom: Headroom | None) -> None:
            if headroom is None:
                return
            self.health.observe_headroom((provider, model.id), headroom)
            for listener in self.listeners:
                listener(provider, model.id, headroom)

        return sink


def annotate(span: trace.Span, value: object, choice: Choice) -> None:
    """OpenTelemetry GenAI attributes of a finished call (no prompt or completion text)."""
    if isinstance(value, ChatResult):
        span.set_attribute("gen_ai.response.model", value.provider_model or choice.model.provider_model)
        span.set_attribute("gen_ai.response.id", value.response_id)
        span.set_attribute("gen_ai.response.finish_reasons", [value.finish.value])
        span.set_attribute("gen_ai.usage.input_tokens", value.usage.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", value.usage.output_tokens)
    elif isinstance(value, EmbedResult):
        span.set_attribute("gen_ai.response.model", value.provider_model or choice.model.provider_model)
        span.set_attribute("gen_ai.usage.input_tokens", value.usage.input_tokens)


async def _close(events: AsyncIterator[Delta | ChatResult]) -> None:
    closer = getattr(events, "aclose", None)
    if closer is not None:
        with contextlib.suppress(Exception):
            await closer()
