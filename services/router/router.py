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
- a refused key or an account out of credit takes the provider (every model behind its key) out
  of rotation at once, with an alert-worthy log line and a metric: no retry on it, failover to the
  next candidate, until a probe succeeds;
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
from typing import Generic, TypeVar
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from services.kit.errors import (
    BallastError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from services.router.capabilities import fit
from services.router.catalog import Model
from services.router.config import RouterSettings
from services.router.health import HealthBook
from services.router.metrics import RouterMetrics
from services.router.model import ChatRequest, ChatResult, Delta, EmbedResult, Usage
from services.router.pricing import Cost, cost_of
from services.router.providers.base import (
    OUT_OF_ROTATION_OUTCOMES,
    Adapter,
    Headroom,
    Outcome,
    ProviderError,
)
from services.router.routing import Choice, Hints, Plan, Planner
from services.router.tokens import estimate_chat, estimate_embedding

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


@dataclass(frozen=True)
class Operation:
    """What kind of call the attempts make, for spans, metrics and latency bookkeeping."""

    # gen_ai.operation.name: chat | embeddings
    name: str
    # "call": a whole answer; "first_token": a stream's first content (what stall detection uses).
    latency_kind: str = "call"
    # False for streams: the span stays open until the stream ends.
    end_span: bool = True


CHAT = Operation("chat")
CHAT_STREAM = Operation("chat", latency_kind="first_token", end_span=False)
EMBEDDINGS = Operation("embeddings")


@dataclass
class Success(Generic[T]):
    """The attempt that answered: its value, who answered, the trail so far and its span."""

    value: T
    choice: Choice
    attempts: list[AttemptRecord]
    span: trace.Span


@dataclass
class _Request(Generic[T]):
    """One request on its way through its plan: what it runs, and what it has tried so far."""

    call: Call
    plan: Plan
    operation: Operation
    attempt: Callable[[Adapter, Choice], Awaitable[T]]
    max_attempts: int
    attempts: list[AttemptRecord] = field(default_factory=list)
    errors: list[ProviderError] = field(default_factory=list)
    made: int = 0
    # Whether the current round made at least one call (a round of skips ends the request).
    progressed: bool = False


# The request field a provider's `param` names, in Ballast's request (for INVALID_ARGUMENT).
_PROVIDER_FIELDS = {
    "temperature": "params.temperature",
    "top_p": "params.top_p",
    "max_tokens": "params.max_output_tokens",
    "max_completion_tokens": "params.max_output_tokens",
    "stop": "params.stop",
    "stop_sequences": "params.stop",
    "seed": "params.seed",
    "tools": "tools",
    "tool_choice": "tool_choice",
}


def _caller_field(provider_field: str) -> str:
    head = provider_field.split(".", 1)[0].split("[", 1)[0]
    return _PROVIDER_FIELDS.get(head, "messages")


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
        self._span_attributes: dict[tuple[str, str, str, str, bool, str], dict[str, AttributeValue]] = {}

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
            if attempts and all(a.outcome is Outcome.OUT_OF_ROTATION for a in attempts):
                return FailedPrecondition(
                    f"every provider of {plan.resolved!r} is out of rotation (refused key or no credit): {trail}"
                )
            return Unavailable(f"every candidate of {plan.resolved!r} has an open circuit breaker: {trail}")
        if self.clock() >= call.deadline - MIN_ATTEMPT_TIME and all(
            e.outcome is Outcome.TIMEOUT for e in errors[-1:]
        ):
            return DeadlineExceeded(f"the deadline passed before a provider answered: {trail}")
        limited = [e for e in errors if e.outcome not in OUT_OF_ROTATION_OUTCOMES]
        if limited and all(e.outcome is Outcome.RATE_LIMITED for e in limited):
            # Providers out of rotation will not help; the rate-limited ones will, after the wait.
            waits = [e.retry_after for e in limited if e.retry_after is not None]
            return ResourceExhausted(
                f"every provider of {plan.resolved!r} is rate limited: {trail}",
                retry_after=min(waits) if waits else 1.0,
                reason="PROVIDER_RATE_LIMITED",
            )
        if all(e.outcome is Outcome.CLIENT_ERROR or e.outcome in OUT_OF_ROTATION_OUTCOMES for e in errors):
            return FailedPrecondition(
                f"every provider of {plan.resolved!r} refused the router's credentials or model: {trail}"
            )
        return Unavailable(f"no provider of {plan.resolved!r} could answer: {trail}")

    async def _run(
        self,
        call: Call,
        plan: Plan,
        operation: Operation,
        attempt: Callable[[Adapter, Choice], Awaitable[T]],
    ) -> Success[T]:
        """Tries the plan's candidates, round after round, until one answers or it is time to stop."""
        request = _Request(
            call, plan, operation, attempt, call.hints.max_attempts or self.settings.retry.max_attempts
        )
        round_ = 0
        while True:
            success, round_errors = await self._round(request, round_)
            if success is not None:
                return success
            round_ += 1
            wait = self._next_round_wait(request, round_, round_errors)
            if wait is None:
                raise self._failure(call, plan, request.attempts, request.errors)
            await self.sleep(wait)

    async def _round(
        self, request: _Request[T], round_: int
    ) -> tuple[Success[T] | None, list[ProviderError]]:
        """One pass over the candidates: the first success, else the errors this round met."""
        round_errors: list[ProviderError] = []
        request.progressed = False
        choices = request.plan.choices
        for position, choice in enumerate(choices):
            if request.made >= request.max_attempts:
                break
            target = choice.target
            if not self.health.acquire(target):
                if round_ == 0:
                    request.attempts.append(self._skipped(target))
                    self._count(request.operation.name, request.attempts[-1])
                continue
            more = request.made + 1 < request.max_attempts and any(
                self.health.available(c.target) for c in choices[position + 1 :]
            )
            time_limit = self._timeout_for(request.call, more, target, request.operation.latency_kind)
            if time_limit < MIN_ATTEMPT_TIME:
                self.health.release(target)
                raise DeadlineExceeded(
                    "the deadline passed before a provider answered"
                    + (
                        ": "
                        + "; ".join(f"{a.provider}/{a.model}: {a.outcome.value}" for a in request.attempts)
                        if request.attempts
                        else ""
                    )
                )
            request.made += 1
            request.progressed = True
            outcome = await self._try(request, choice, time_limit)
            if isinstance(outcome, Success):
                return outcome, round_errors
            round_errors.append(outcome)
            request.errors.append(outcome)
        return None, round_errors

    def _next_round_wait(
        self, request: _Request[T], round_: int, round_errors: list[ProviderError]
    ) -> float | None:
        """How long to back off before round `round_`; None when another round is not worth it."""
        if not request.progressed or request.made >= request.max_attempts:
            return None
        if not any(self.health.available(c.target) for c in request.plan.choices):
            # Every candidate is out of rotation or behind an open breaker: waiting a backoff
            # would not change that.
            return None
        wait = self._backoff(round_, round_errors)
        if (
            wait > self.settings.retry.max_retry_after
            or self.clock() + wait >= request.call.deadline - MIN_ATTEMPT_TIME
        ):
            return None
        return wait

    async def _try(
        self, request: _Request[T], choice: Choice, time_limit: float
    ) -> Success[T] | ProviderError:
        """One attempt on one candidate, traced and recorded; a caller's mistake ends the request."""
        operation = request.operation
        started = self.clock()
        span = self._span(operation.name, choice)
        try:
            async with asyncio.timeout(time_limit):
                value = await request.attempt(self.adapters[choice.provider.name], choice)
        except TimeoutError:
            error = ProviderError(Outcome.TIMEOUT, f"no answer within {time_limit:.3f}s")
        except ProviderError as exc:
            error = exc
        except BaseException:
            self.health.release(choice.target)
            span.end()
            raise
        else:
            self._succeeded(request, choice, self.clock() - started)
            annotate(span, value, choice)
            if operation.end_span:
                span.end()
            return Success(value, choice, request.attempts, span)
        span.set_attribute("error.type", error.outcome.value)
        span.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
        span.end()
        self._failed(request, choice, error, self.clock() - started)
        if error.caller_fault:
            raise InvalidArgument(
                _caller_field(error.field),
                f"provider {choice.provider.name} rejected the request: {error.message}",
            )
        return error

    def _span(self, operation: str, choice: Choice) -> trace.Span:
        provider = choice.provider
        key = (
            operation,
            provider.name,
            provider.kind,
            provider.base_url,
            provider.simulated,
            choice.model.provider_model,
        )
        attributes = self._span_attributes.get(key)
        if attributes is None:
            # Built once per provider, model and operation: parsing the base URL on every attempt
            # cost more than the rest of the span.
            address = urlsplit(choice.provider.base_url)
            attributes = self._span_attributes[key] = {
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": choice.provider.kind,
                "gen_ai.request.model": choice.model.provider_model,
                "server.address": address.hostname or "",
                "server.port": address.port or (443 if address.scheme == "https" else 80),
                "ballast.router.provider": choice.provider.name,
                "ballast.router.simulated": choice.provider.simulated,
            }
        return self.tracer.start_span(
            f"{operation} {choice.model.provider_model}", kind=trace.SpanKind.CLIENT, attributes=attributes
        )

    def _succeeded(self, request: _Request[T], choice: Choice, latency: float) -> None:
        target, operation = choice.target, request.operation
        if self.health.out_of_rotation(choice.provider.name) is not None:
            log.warning(
                "provider back in rotation",
                extra={"provider": choice.provider.name, "model": choice.model.id},
            )
        self.health.success(target, latency, operation.latency_kind)
        if operation.latency_kind == "first_token" and self.metrics is not None:
            self.metrics.first_token(operation.name, choice.provider.name, choice.model.id, latency)
        request.attempts.append(AttemptRecord(*target, Outcome.OK, 200, latency))
        self._count(operation.name, request.attempts[-1])

    def _failed(self, request: _Request[T], choice: Choice, error: ProviderError, latency: float) -> None:
        target = choice.target
        if error.outcome in OUT_OF_ROTATION_OUTCOMES:
            self._take_out(choice, error, request.call)
        self.health.failure(target, error.outcome, latency, error.retry_after)
        request.attempts.append(
            AttemptRecord(*target, error.outcome, error.http_status, latency, error.message)
        )
        self._count(request.operation.name, request.attempts[-1])
        log.info(
            "attempt failed",
            extra={
                "provider": target[0],
                "model": target[1],
                "outcome": error.outcome.value,
                "http_status": error.http_status,
                "request_id": request.call.request_id,
            },
        )

    def _skipped(self, target: tuple[str, str]) -> AttemptRecord:
        removal = self.health.out_of_rotation(target[0])
        if removal is not None:
            return AttemptRecord(
                *target, Outcome.OUT_OF_ROTATION, error=f"out of rotation ({removal.reason})"
            )
        return AttemptRecord(*target, Outcome.BREAKER_OPEN, error="circuit open")

    def _take_out(self, choice: Choice, error: ProviderError, call: Call) -> None:
        """Takes the provider out of rotation; says so loudly the first time."""
        provider = choice.provider.name
        if not self.health.take_out(provider, error.category, error.http_status):
            return
        # ERROR level and a fixed event name: what an operator's alert matches on. No retry clears
        # this; someone has to fix the key or the account (a probe then brings it back).
        log.error(
            "provider out of rotation",
            extra={
                "alert": "router_provider_out_of_rotation",
                "provider": provider,
                "model": choice.model.id,
                "reason": error.category,
                "http_status": error.http_status,
                "probe_in_seconds": self.health.settings.rotation_probe_interval,
                "request_id": call.request_id,
            },
        )
        if self.metrics is not None:
            self.metrics.out_of_rotation(provider, error.category)

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
            return await adapter.complete(choice.model, fit(choice.model, request))

        success = await self._run(call, plan, CHAT, attempt)
        result, choice, attempts = success.value, success.choice, success.attempts
        await settle_usage(result, choice, request)
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

        success = await self._run(call, plan, EMBEDDINGS, attempt)
        result, choice, attempts = success.value, success.choice, success.attempts
        if not result.usage_reported:
            result.usage = await asyncio.to_thread(estimate_embedding, choice.model.provider_model, inputs)
        cost = self._answered("embeddings", choice, result.usage, cost_of(choice.model, result.usage))
        return Embedded(result, choice, attempts, cost)

    async def stream(self, call: Call, request: ChatRequest) -> AsyncIterator[StreamStarted | Delta | Answer]:
        """StreamStarted, then deltas, then the Answer; failover happens only before StreamStarted."""
        started = self.clock()
        plan = self._chat_plan(call, request)
        timeouts = self.settings.timeouts
        holder: dict[str, AsyncIterator[Delta | ChatResult]] = {}

        async def first_event(adapter: Adapter, choice: Choice) -> Delta | ChatResult:
            events = adapter.stream(choice.model, fit(choice.model, request))
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

        success = await self._run(call, plan, CHAT_STREAM, first_event)
        first, choice, attempts, span = success.value, success.choice, success.attempts, success.span
        events = holder["events"]
        target = choice.target
        # _run counted the first token as success; a later break is recorded as a failure below.
        item: Delta | ChatResult = first
        guard = _WaitGuard()
        try:
            yield StreamStarted(choice, choice.provider.simulated)
            while not isinstance(item, ChatResult):
                yield item
                remaining = call.deadline - self.clock()
                if remaining <= 0:
                    raise ProviderError(Outcome.TIMEOUT, "the deadline passed mid-stream")
                guard.begin(min(timeouts.stream_idle, remaining))
                try:
                    item = await anext(events)
                except asyncio.CancelledError:
                    if guard.expired():
                        raise ProviderError(Outcome.TIMEOUT, "the stream stalled") from None
                    raise
                except StopAsyncIteration:
                    raise ProviderError(
                        Outcome.PROTOCOL_ERROR, "the stream ended without an answer"
                    ) from None
                finally:
                    guard.end()
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
            guard.close()
            await _close(events)
            if not isinstance(item, ChatResult):
                span.end()
        result = item
        await settle_usage(result, choice, request)
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


async def settle_usage(result: ChatResult, choice: Choice, request: ChatRequest) -> None:
    """A provider that reported no usage gets a flagged tokenizer estimate, never zero.

    Counting is off the event loop: about 0.5 ms per thousand tokens, which a long prompt would
    otherwise take from every other call this replica is serving."""
    if not result.usage_reported:
        result.usage = await asyncio.to_thread(
            estimate_chat, choice.model.provider_model, request, result.message
        )


def annotate(span: trace.Span, value: object, choice: Choice) -> None:
    """OpenTelemetry GenAI attributes of a finished call (no prompt or completion text)."""
    # One set_attributes: the span's lock is taken once, not once per attribute.
    if isinstance(value, ChatResult):
        span.set_attributes(
            {
                "gen_ai.response.model": value.provider_model or choice.model.provider_model,
                "gen_ai.response.id": value.response_id,
                "gen_ai.response.finish_reasons": (value.finish.value,),
                "gen_ai.usage.input_tokens": value.usage.input_tokens,
                "gen_ai.usage.output_tokens": value.usage.output_tokens,
            }
        )
    elif isinstance(value, EmbedResult):
        span.set_attributes(
            {
                "gen_ai.response.model": value.provider_model or choice.model.provider_model,
                "gen_ai.usage.input_tokens": value.usage.input_tokens,
            }
        )


class _WaitGuard:
    """A time limit on each wait for a stream's next item (what asyncio.timeout around every
    wait would do), with one timer per stream instead of one per item: the timer is re-armed
    only when it fires early, so a stream of many quick items costs two attribute writes each.

    Time between waits (the caller taking its time with the last item) is not counted, as
    before. An expired wait cancels the task; `expired()` tells that cancellation from any
    other (which is passed on)."""

    __slots__ = ("_cancelling", "_fired", "_loop", "_task", "_timer", "_until", "_waiting")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self._timer: asyncio.TimerHandle | None = None
        self._until = 0.0
        self._waiting = False
        self._fired = False

    def begin(self, limit: float) -> None:
        task = asyncio.current_task()
        if task is not self._task:  # a stream may be read by another task than the one that began it
            assert task is not None
            self._task, self._cancelling = task, task.cancelling()
        self._until = until = self._loop.time() + limit
        self._waiting = True
        if self._timer is None or self._timer.when() > until:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(until, self._check)

    def end(self) -> None:
        self._waiting = False

    def _check(self) -> None:
        self._timer = None
        if not self._waiting:
            return  # the next begin() arms it again
        if self._loop.time() >= self._until:
            self._fired = True
            self._task.cancel()
        else:
            self._timer = self._loop.call_at(self._until, self._check)

    def expired(self) -> bool:
        """Whether the CancelledError being handled is this guard's (and then undoes it)."""
        if not self._fired:
            return False
        self._fired = False
        return self._task.uncancel() <= self._cancelling

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def _close(events: AsyncIterator[Delta | ChatResult]) -> None:
    closer = getattr(events, "aclose", None)
    if closer is not None:
        with contextlib.suppress(Exception):
            await closer()
