"""One chat turn through the whole path: limits, context and cache at once, then the
model on a miss, then the session, the cache and the limiter settle concurrently.

Latency is the slowest of the first three calls, not their sum. A stateless chat's
answer-cache lookup runs beside the other two. A chat in a session is looked up once its
context is known: as a standalone turn (exact, then semantic) when the session holds no
earlier turns, else exactly with the full conversation (a follow-up is only a hit in the
same state). Guessing the standalone lookup concurrently cost an embedding per session chat
whose answer was thrown away whenever the session had history.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ballast.cache.v1 import cache_pb2
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2
from ballast.limiter.v1 import limiter_pb2
from ballast.router.v1 import router_pb2
from ballast.sessions.v1 import sessions_pb2
from opentelemetry import metrics, trace

from services.edge.config import EdgeSettings
from services.edge.downstream import Deadline, Downstream
from services.edge.metrics import EdgeMetrics
from services.edge.settlement import Settler, unreserved_id
from services.kit.errors import BallastError, DeadlineExceeded, ResourceExhausted, Unavailable
from services.kit.protos import duration, seconds

log = logging.getLogger("ballast.edge.chat")
T = TypeVar("T")

SUMMARY_PREFIX = "Summary of the earlier conversation:\n"


def new_request_id() -> str:
    return "req_" + secrets.token_hex(8)


def estimate_tokens(messages: list[common_pb2.ChatMessage]) -> int:
    """A cheap upper-bound guess for the reservation; the limiter settles the real count after."""
    total = 0
    for message in messages:
        total += 4 + len(message.content) // 3
        for call in message.tool_calls:
            total += 4 + (len(call.name) + len(call.arguments_json)) // 3
    return total


def request_fingerprint(request: edge_pb2.ChatRequest) -> str:
    """What makes two chat calls the same request, for the session's idempotency key."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


def replayed_answer(
    fresh: router_pb2.CompleteResponse, turns: list[sessions_pb2.Turn]
) -> router_pb2.CompleteResponse:
    original = next((t for t in reversed(turns) if t.message.role == common_pb2.ROLE_ASSISTANT), None)
    if original is None:
        return fresh
    answer = router_pb2.CompleteResponse()
    answer.CopyFrom(fresh)
    answer.message.CopyFrom(original.message)
    answer.usage.CopyFrom(original.usage)
    answer.cost.Clear()
    answer.cost.total_cost_micros = original.cost_micros
    answer.model = original.model or fresh.model
    answer.finish_reason = (
        common_pb2.FINISH_REASON_TOOL_CALLS if original.message.tool_calls else common_pb2.FINISH_REASON_STOP
    )
    return answer


def cache_model(caller: common_pb2.Caller, request: edge_pb2.ChatRequest) -> str:
    """The model part of the cache scope: what was asked for, known before routing.

    An empty model means the tier's default, so tiers (which may map to different models)
    never share answers through it; lookup and store must use the same value.
    """
    return request.model or f"default:{caller.tier or 'none'}"


def quota_metadata(quotas: list[common_pb2.Quota]) -> tuple[tuple[str, str], ...]:
    """x-ratelimit-* trailing metadata from the most constraining finite quota."""
    finite = [q for q in quotas if not q.unlimited and q.limit > 0]
    if not finite:
        return ()
    tightest = min(finite, key=lambda q: q.remaining / q.limit)
    reset = seconds(tightest.reset_after)
    return (
        ("x-ratelimit-limit", str(tightest.limit)),
        ("x-ratelimit-remaining", str(max(0, tightest.remaining))),
        ("x-ratelimit-reset", f"{reset:.3f}"),
        ("x-ratelimit-policy", tightest.name),
    )


@dataclass(frozen=True, slots=True)
class _Billed:
    """What this turn cost the caller: the model's usage and cost, or nothing for a cache hit."""

    usage: common_pb2.Usage
    cost: common_pb2.Cost
    cost_micros: int
    tokens: int

    @classmethod
    def of(cls, answer: router_pb2.CompleteResponse, *, cache_hit: bool) -> _Billed:
        if cache_hit:
            return cls(common_pb2.Usage(), common_pb2.Cost(), 0, 0)
        usage = answer.usage
        tokens = usage.total_tokens or (usage.input_tokens + usage.output_tokens)
        return cls(usage, answer.cost, answer.cost.total_cost_micros, tokens)


def _trace_answer(answer: router_pb2.CompleteResponse, billed: _Billed) -> None:
    trace.get_current_span().set_attributes(
        {
            "ballast.router.provider": answer.provider,
            "ballast.router.model": answer.model,
            "ballast.router.attempts": len(answer.attempts),
            "ballast.cost.micros": billed.cost_micros,
            "ballast.usage.input_tokens": billed.usage.input_tokens,
            "ballast.usage.output_tokens": billed.usage.output_tokens,
        }
    )


@dataclass
class Prepared:
    """Everything known before the model is called."""

    request_id: str
    caller: common_pb2.Caller
    request: edge_pb2.ChatRequest
    model_messages: list[common_pb2.ChatMessage]
    session_version: int = -1
    reservation_id: str = ""
    quotas: list[common_pb2.Quota] = field(default_factory=list)
    throttle_delay: float = 0.0
    cached: cache_pb2.LookupResponse | None = None
    # A turn after earlier ones in a session: its answer is cached for the exact tier only.
    follow_up: bool = False
    # The limiter could not be asked (it failed open): what the model spends is still settled,
    # under an id of the edge's own so that a retried settlement is not charged twice.
    unchecked: bool = False
    # The limiter's priority for this caller: the router keeps providers' last headroom for high.
    priority: int = common_pb2.PRIORITY_UNSPECIFIED


def _log_failed(prepared: Prepared, results: Mapping[str, Any], names: Sequence[str], when: str) -> None:
    """A warning for each of the jobs `names` that failed (a job's result is its exception)."""
    for name in names:
        if isinstance(results.get(name), BaseException):
            log.warning(
                "%s %s failed: %s", name, when, results[name], extra={"request_id": prepared.request_id}
            )


async def _settle(awaitable: Awaitable[T]) -> T | BaseException:
    try:
        return await awaitable
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError):
            raise
        return exc


class ChatPipeline:
    def __init__(
        self,
        settings: EdgeSettings,
        downstream: Downstream,
        settler: Settler,
        meter: metrics.Meter | None = None,
        edge_metrics: EdgeMetrics | None = None,
    ) -> None:
        self._settings = settings
        self._down = downstream
        self._settler = settler
        self._metrics = edge_metrics
        # Session appends and cache stores of answers whose caller went away (finish): held
        # here until they end, since nothing else refers to them.
        self._unattended: set[asyncio.Future[list[Any]]] = set()
        self._context_incomplete = (meter or metrics.NoOpMeter("ballast")).create_counter(
            "ballast.edge.context.omitted_unsummarized",
            description="Chats whose session context left out older turns that no summary covers",
        )

    # --- before the model ------------------------------------------------------------------------------

    def _cache_scope(self, caller: common_pb2.Caller, request: edge_pb2.ChatRequest) -> cache_pb2.Scope:
        # Answers are shared within a tenant and namespace; a per-user namespace keeps personal ones apart.
        return cache_pb2.Scope(tenant_id=caller.tenant_id, namespace=request.cache_namespace or "default")

    def _system(self, request: edge_pb2.ChatRequest) -> list[common_pb2.ChatMessage]:
        if not request.system_prompt:
            return []
        return [common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=request.system_prompt)]

    async def _check(
        self, caller: common_pb2.Caller, request: edge_pb2.ChatRequest, request_id: str, deadline: Deadline
    ) -> limiter_pb2.CheckResponse | None:
        output = request.params.max_output_tokens or self._settings.reserve_output_tokens
        context = (request.context_token_budget or self._settings.context_tokens) if request.session_id else 0
        check = limiter_pb2.CheckRequest(
            caller=caller,
            session_id=request.session_id,
            requests=1,
            reserve_tokens=estimate_tokens(list(request.messages)) + context + output,
            request_id=request_id,
        )
        try:
            return await self._down.call(
                "limiter", self._down.limiter.Check, check, self._down.timeout(deadline, caller)
            )
        except (Unavailable, DeadlineExceeded) as exc:
            if self._settings.limiter_failure == "open":
                log.warning("limiter unavailable; failing open", extra={"request_id": request_id})
                return None
            raise Unavailable("the limiter is unavailable and BALLAST_EDGE_LIMITER_FAILURE=closed") from exc

    async def _context(
        self, caller: common_pb2.Caller, request: edge_pb2.ChatRequest, deadline: Deadline
    ) -> sessions_pb2.GetContextResponse | None:
        if not request.session_id:
            return None
        get = sessions_pb2.GetContextRequest(
            caller=caller,
            session_id=request.session_id,
            token_budget=request.context_token_budget or self._settings.context_tokens,
            model=request.model,
        )
        reply: sessions_pb2.GetContextResponse = await self._down.call(
            "sessions", self._down.sessions.GetContext, get, self._down.timeout(deadline, caller)
        )
        if reply.omitted_unsummarized:
            # The model will not see those turns at all (sessions could not summarise them).
            trace.get_current_span().set_attribute(
                "ballast.session.omitted_unsummarized_turns", reply.omitted_turns
            )
            tenant = self._metrics.tenant(caller.tenant_id) if self._metrics else caller.tenant_id
            self._context_incomplete.add(1, {"tenant": tenant})
        return reply

    async def _lookup(
        self,
        caller: common_pb2.Caller,
        request: edge_pb2.ChatRequest,
        messages: list[common_pb2.ChatMessage],
        deadline: Deadline,
        *,
        semantic: bool,
    ) -> cache_pb2.LookupResponse | None:
        mode = request.cache_mode
        if mode in (edge_pb2.CACHE_MODE_BYPASS, edge_pb2.CACHE_MODE_REFRESH):
            return None
        lookup = cache_pb2.LookupRequest(
            scope=self._cache_scope(caller, request),
            model=cache_model(caller, request),
            messages=messages,
            tools=request.tools,
            params=request.params,
            semantic=semantic and mode != edge_pb2.CACHE_MODE_EXACT_ONLY,
            allow_nondeterministic=request.allow_nondeterministic_cache,
        )
        try:
            return await self._down.call(
                "cache", self._down.cache.Lookup, lookup, self._down.timeout(deadline, caller)
            )
        except BallastError as exc:
            # A cache outage costs a model call, never the chat.
            log.warning("cache lookup failed (%s); treating as a miss", exc.message)
            return None

    async def prepare(
        self, caller: common_pb2.Caller, request: edge_pb2.ChatRequest, request_id: str, deadline: Deadline
    ) -> Prepared:
        system = self._system(request)
        standalone = [*system, *request.messages]
        # The Check runs in this task and, beside it in a task of its own, a session chat's context
        # or a stateless chat's cache lookup (a session chat is looked up once its context is
        # known): one task a chat, not three and a gather.
        beside: asyncio.Future[Any] = asyncio.ensure_future(
            self._context(caller, request, deadline)
            if request.session_id
            else self._lookup(caller, request, standalone, deadline, semantic=True)
        )
        check: limiter_pb2.CheckResponse | None = None
        try:
            check = await self._check(caller, request, request_id, deadline)
            found = await beside
        except BaseException:
            beside.cancel()
            # A reservation made by a Check that succeeded must not leak.
            if check is not None and check.reservation_id:
                await self._release(caller, check.reservation_id, deadline)
            raise
        context: sessions_pb2.GetContextResponse | None = found if request.session_id else None
        cached: cache_pb2.LookupResponse | None = None if request.session_id else found
        prepared = Prepared(request_id=request_id, caller=caller, request=request, model_messages=standalone)
        if check is None:
            prepared.unchecked = True
        else:
            prepared.reservation_id = check.reservation_id
            # A repeated request id (a retried job, a client's retry) gets the earlier Check's
            # reservation back, which the earlier try may have settled already: this try's model
            # call is settled under an id of its own, or its tokens would go uncharged.
            prepared.unchecked = check.replayed
            prepared.quotas = [status.quota for status in check.limits]
            prepared.priority = check.priority
        if context is not None:
            prepared.session_version = context.version
            history: list[common_pb2.ChatMessage] = []
            if context.summary:
                history.append(
                    common_pb2.ChatMessage(
                        role=common_pb2.ROLE_SYSTEM, content=SUMMARY_PREFIX + context.summary
                    )
                )
            history.extend(turn.message for turn in context.turns)
            if history:
                prepared.model_messages = [*system, *history, *request.messages]
                prepared.follow_up = True
            # A follow-up is looked up exactly with the full conversation: its partition holds
            # this session's own history, so no vector of it could be there to compare with.
            cached = await self._lookup(
                caller, request, prepared.model_messages, deadline, semantic=not prepared.follow_up
            )
        prepared.cached = cached if cached is not None and cached.hit else None
        span = trace.get_current_span()
        span.set_attributes(
            {
                "ballast.request.id": request_id,
                "ballast.tenant.id": caller.tenant_id,
                "ballast.tier": caller.tier,
                "ballast.session.id": request.session_id,
                "ballast.limiter.decision": (
                    limiter_pb2.Decision.Name(check.decision) if check is not None else "UNCHECKED"
                ),
                "ballast.cache.hit": prepared.cached is not None,
            }
        )
        if prepared.cached is not None:
            span.set_attributes(
                {
                    "ballast.cache.similarity": prepared.cached.similarity,
                    "ballast.cache.tier": cache_pb2.HitTier.Name(prepared.cached.tier),
                }
            )
        if check is not None:
            await self._apply_decision(prepared, check, deadline)
        return prepared

    async def _apply_decision(
        self, prepared: Prepared, check: limiter_pb2.CheckResponse, deadline: Deadline
    ) -> None:
        trailing = quota_metadata(prepared.quotas)
        if check.decision == limiter_pb2.DECISION_DENY:
            retry_after = seconds(check.retry_after)
            error = ResourceExhausted(
                f"rate limited by {check.reason or 'a limit'}; retry after {retry_after:.1f}s",
                retry_after=retry_after,
                reason=check.reason,
            )
            error.trailing = trailing
            raise error
        if check.decision == limiter_pb2.DECISION_DELAY:
            delay = seconds(check.delay)
            budget = deadline.cap(self._settings.max_throttle_wait)
            if delay > budget:
                await self._release(prepared.caller, prepared.reservation_id, deadline)
                error = ResourceExhausted(
                    f"throttled by {check.reason or 'provider headroom'}: waiting {delay:.1f}s would pass the "
                    f"deadline or BALLAST_EDGE_MAX_THROTTLE_WAIT",
                    retry_after=delay,
                    reason=check.reason,
                )
                error.trailing = trailing
                raise error
            prepared.throttle_delay = delay
            await asyncio.sleep(delay)

    async def _release(self, caller: common_pb2.Caller, reservation_id: str, deadline: Deadline) -> None:
        if not reservation_id:
            return
        with contextlib.suppress(BallastError):
            await self._down.call(
                "limiter",
                self._down.limiter.Commit,
                limiter_pb2.CommitRequest(reservation_id=reservation_id, caller=caller, actual_tokens=0),
                self._down.timeout(deadline),
            )

    # --- the model -------------------------------------------------------------------------------------

    def complete_request(self, prepared: Prepared) -> router_pb2.CompleteRequest:
        request = prepared.request
        return router_pb2.CompleteRequest(
            model=request.model,
            messages=prepared.model_messages,
            tools=request.tools,
            tool_choice=request.tool_choice,
            params=request.params,
            hints=request.routing,
            caller=prepared.caller,
            request_id=prepared.request_id,
            priority=prepared.priority,  # type: ignore[arg-type] # the same enum, read back as int
        )

    async def call_model(self, prepared: Prepared, deadline: Deadline) -> router_pb2.CompleteResponse:
        try:
            return await self._down.call(
                "router", self._down.router.Complete, self.complete_request(prepared), deadline.remaining()
            )
        except BaseException:
            await self._release(
                prepared.caller, prepared.reservation_id, Deadline(self._settings.downstream_timeout)
            )
            raise

    # --- after the model -------------------------------------------------------------------------------

    async def finish(
        self,
        prepared: Prepared,
        answer: router_pb2.CompleteResponse,
        *,
        cache_hit: bool,
        similarity: float = 0.0,
    ) -> edge_pb2.ChatResponse:
        """Appends to the session, stores in the cache and settles the limiter, concurrently."""
        billed = _Billed.of(answer, cache_hit=cache_hit)
        # The session and the limiter must hear of the answer even if the caller's deadline is
        # gone or the caller hung up: the tokens were spent. The limiter's settlement is retried
        # and, past BALLAST_EDGE_SETTLE_WAIT, recorded and applied later (settlement.py); the
        # cache's copy is a convenience and keeps the short timeout.
        jobs: dict[str, Awaitable[Any]] = {}
        if prepared.request.session_id:
            jobs["append"] = self._append_answer(
                prepared, answer, billed, Deadline(self._down.call_timeout(prepared.caller))
            )
        if not cache_hit and prepared.request.cache_mode != edge_pb2.CACHE_MODE_BYPASS:
            jobs["store"] = self._store_answer(prepared, answer, Deadline(self._settings.downstream_timeout))
        if (prepared.reservation_id and not prepared.unchecked) or (prepared.unchecked and billed.tokens > 0):
            jobs["commit"] = self._commit_spend(prepared, billed)
        # Started at once, and not cancelled with the caller (a client gone while they run): the
        # answer was paid for, so the session records the turn (a retry with the same idempotency
        # key gets this answer back) and the next caller who asks the same gets it from the cache.
        gathered = asyncio.gather(*(_settle(j) for j in jobs.values()))
        try:
            done = await asyncio.shield(gathered)
        except asyncio.CancelledError:
            if not gathered.done():
                self._unattended.add(gathered)
                gathered.add_done_callback(functools.partial(self._unattended_ended, list(jobs), prepared))
            raise
        results = dict(zip(jobs, done, strict=True))
        _log_failed(prepared, results, ("store",), "after the model")
        session_version = prepared.session_version
        appended = results.get("append")
        if isinstance(appended, BaseException):
            raise appended
        if appended is not None:
            session_version = appended.session.version
            if appended.replayed:
                # This request was already answered and recorded (its reply was lost on the way):
                # give back that answer, so the session and the client agree.
                answer = replayed_answer(answer, list(appended.turns))
        _trace_answer(answer, billed)
        if cache_hit and self._metrics is not None and prepared.cached is not None:
            # What the model charged when it made the cached answer: spent once, saved on every hit.
            hit = prepared.cached.answer
            self._metrics.cache_saved(prepared.caller, hit.model, hit.usage, hit.cost.total_cost_micros)
        quotas = prepared.quotas
        committed = results.get("commit")
        # None when the settlement was recorded to apply later: the quotas from the Check stand.
        if committed is not None and not isinstance(committed, BaseException):
            quotas = _merge_quotas(quotas, list(committed.budgets))
        return edge_pb2.ChatResponse(
            message=answer.message,
            finish_reason=answer.finish_reason,
            usage=billed.usage,
            cost=billed.cost,
            cache_hit=cache_hit,
            cache_similarity=similarity,
            provider=answer.provider,
            model=answer.model,
            simulated=answer.simulated,
            session_version=session_version,
            request_id=prepared.request_id,
            quotas=quotas,
            attempts=answer.attempts,
            throttle_delay=duration(prepared.throttle_delay),
        )

    async def drain(self, grace: float) -> None:
        """Waits (up to `grace`) for the answers still being recorded for callers that went away."""
        if self._unattended:
            await asyncio.wait(set(self._unattended), timeout=grace)

    @property
    def unattended(self) -> int:
        """Answers still being recorded after their caller went away (observability and tests)."""
        return len(self._unattended)

    def _unattended_ended(
        self, names: list[str], prepared: Prepared, gathered: asyncio.Future[list[Any]]
    ) -> None:
        self._unattended.discard(gathered)
        if not gathered.cancelled():
            results = dict(zip(names, gathered.result(), strict=True))
            # The settler logs its own failures (commit).
            _log_failed(prepared, results, ("append", "store"), "after the caller went away")

    def _append_answer(
        self, prepared: Prepared, answer: router_pb2.CompleteResponse, billed: _Billed, after: Deadline
    ) -> Awaitable[sessions_pb2.AppendTurnsResponse]:
        """The turn's messages and the answer, appended to the session."""
        request = prepared.request
        turns = [sessions_pb2.Turn(message=m) for m in request.messages]
        turns.append(
            sessions_pb2.Turn(
                message=answer.message,
                usage=billed.usage,
                cost_micros=billed.cost_micros,
                model=answer.model,
            )
        )
        return self._down.call(
            "sessions",
            self._down.sessions.AppendTurns,
            sessions_pb2.AppendTurnsRequest(
                caller=prepared.caller,
                session_id=request.session_id,
                expected_version=prepared.session_version,
                idempotency_key=request.idempotency_key or prepared.request_id,
                # A retried request is the same request even though the model answered anew.
                request_fingerprint=request_fingerprint(request),
                turns=turns,
            ),
            self._down.timeout(after, prepared.caller),
        )

    def _store_answer(
        self, prepared: Prepared, answer: router_pb2.CompleteResponse, after: Deadline
    ) -> Awaitable[cache_pb2.StoreResponse]:
        """The model's answer, stored in the cache for the next caller who asks the same."""
        request, caller = prepared.request, prepared.caller
        return self._down.call(
            "cache",
            self._down.cache.Store,
            cache_pb2.StoreRequest(
                scope=self._cache_scope(caller, request),
                model=cache_model(caller, request),
                messages=prepared.model_messages,
                tools=request.tools,
                params=request.params,
                answer=cache_pb2.CachedAnswer(
                    message=answer.message,
                    finish_reason=answer.finish_reason,
                    usage=answer.usage,
                    cost=answer.cost,
                    model=answer.model,
                ),
                allow_nondeterministic=request.allow_nondeterministic_cache,
                # Nothing looks a session's follow-up up semantically: spare its embedding.
                exact_only=prepared.follow_up,
            ),
            self._down.timeout(after),
        )

    def _settle_id(self, prepared: Prepared) -> str:
        """The Check's reservation, or a fresh id when this try's Check reserved nothing new."""
        return (
            unreserved_id() if prepared.unchecked or not prepared.reservation_id else prepared.reservation_id
        )

    def _commit_spend(
        self, prepared: Prepared, billed: _Billed
    ) -> Awaitable[limiter_pb2.CommitResponse | None]:
        """The tokens and cost actually spent, settled against the Check's reservation."""
        return self._settler.settle(
            limiter_pb2.CommitRequest(
                reservation_id=self._settle_id(prepared),
                caller=prepared.caller,
                actual_tokens=billed.tokens,
                cost_micros=billed.cost_micros,
            )
        )

    def cached_answer(self, prepared: Prepared) -> router_pb2.CompleteResponse:
        assert prepared.cached is not None
        hit = prepared.cached.answer
        return router_pb2.CompleteResponse(
            message=hit.message,
            finish_reason=hit.finish_reason,
            usage=hit.usage,
            cost=hit.cost,
            provider="cache",
            model=hit.model,
        )

    # --- the whole turn --------------------------------------------------------------------------------

    async def chat(
        self, caller: common_pb2.Caller, request: edge_pb2.ChatRequest, request_id: str, deadline: Deadline
    ) -> edge_pb2.ChatResponse:
        prepared = await self.prepare(caller, request, request_id, deadline)
        if prepared.cached is not None:
            return await self.finish(
                prepared, self.cached_answer(prepared), cache_hit=True, similarity=prepared.cached.similarity
            )
        answer = await self.call_model(prepared, deadline)
        return await self.finish(prepared, answer, cache_hit=False)

    async def chat_stream(
        self, caller: common_pb2.Caller, request: edge_pb2.ChatRequest, request_id: str, deadline: Deadline
    ) -> AsyncIterator[edge_pb2.ChatStreamResponse]:
        prepared = await self.prepare(caller, request, request_id, deadline)
        if prepared.cached is not None:
            answer = self.cached_answer(prepared)
            yield edge_pb2.ChatStreamResponse(
                start=edge_pb2.ChatStreamStart(
                    request_id=request_id, provider="cache", model=answer.model, cache_hit=True
                )
            )
            # A cached answer is replayed as a stream: its text, then its final event.
            yield edge_pb2.ChatStreamResponse(delta=router_pb2.ContentDelta(text=answer.message.content))
            done = await self.finish(prepared, answer, cache_hit=True, similarity=prepared.cached.similarity)
            yield edge_pb2.ChatStreamResponse(done=done)
            return
        final: router_pb2.CompleteResponse | None = None
        streamed_chars = 0
        try:
            stream = self._down.stream(
                "router",
                self._down.router.StreamComplete,
                router_pb2.StreamCompleteRequest(request=self.complete_request(prepared)),
                deadline.remaining(),
            )
            async for event in stream:
                kind = event.WhichOneof("event")
                if kind == "start":
                    yield edge_pb2.ChatStreamResponse(
                        start=edge_pb2.ChatStreamStart(
                            request_id=request_id,
                            provider=event.start.provider,
                            model=event.start.model,
                            simulated=event.start.simulated,
                        )
                    )
                elif kind == "delta":
                    streamed_chars += len(event.delta.text)
                    yield edge_pb2.ChatStreamResponse(delta=event.delta)
                elif kind == "done":
                    final = event.done
        except BaseException:
            # Tokens already streamed were spent: settle what we can estimate, release the rest.
            spent = estimate_tokens(prepared.model_messages) + streamed_chars // 3 if streamed_chars else 0
            if (prepared.reservation_id and not prepared.unchecked) or (prepared.unchecked and spent > 0):
                # Settled in the background (retried, recorded if need be): this turn is over.
                self._settler.submit(
                    limiter_pb2.CommitRequest(
                        reservation_id=self._settle_id(prepared),
                        caller=caller,
                        actual_tokens=spent,
                    )
                )
            raise
        if final is None:
            raise Unavailable("the router's stream ended without a final answer")
        yield edge_pb2.ChatStreamResponse(done=await self.finish(prepared, final, cache_hit=False))


def _merge_quotas(before: list[common_pb2.Quota], after: list[common_pb2.Quota]) -> list[common_pb2.Quota]:
    merged = {q.name: q for q in before}
    merged.update({q.name: q for q in after})
    return list(merged.values())
