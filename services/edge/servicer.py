"""The edge's public gRPC API: authenticate, validate, then hand to the chat pipeline,
the job runner or the owning service. Transport only."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2, edge_pb2_grpc
from ballast.limiter.v1 import limiter_pb2
from ballast.sessions.v1 import sessions_pb2

from services.edge import auth
from services.edge.config import EdgeSettings
from services.edge.downstream import Deadline, Downstream
from services.edge.edge import ChatPipeline, new_request_id, quota_metadata
from services.edge.jobs import JobRunner, job_to_proto
from services.edge.metrics import EdgeMetrics, failure_outcome
from services.edge.pacing import Lane
from services.edge.store import EdgeStore
from services.edge.tools import ToolCall, ToolCalls, ToolResult
from services.edge.validation import check_id, check_json_object, validate_chat
from services.kit.errors import (
    BallastError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    abort_with,
)
from services.kit.interceptors import Around, AroundInterceptor
from services.kit.protos import seconds, timestamp

Context = grpc.aio.ServicerContext[Any, Any]


class KeyRegistry:
    """Keys from the keys file, then keys made through the admin API (in the edge store)."""

    def __init__(self, file_keys: list[auth.ApiKey], store: EdgeStore) -> None:
        self._by_hash = {key.sha256: key for key in file_keys}
        self._store = store

    async def caller(self, context: Context) -> common_pb2.Caller:
        return await self.caller_from(context.invocation_metadata())

    async def caller_from(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> common_pb2.Caller:
        """The caller for gRPC metadata or HTTP headers (lower-case names, as both deliver them)."""
        secret = auth.key_from_metadata(metadata)
        digest = auth.hash_key(secret)
        key = self._by_hash.get(digest) or await self._store.key_by_hash(digest)
        if key is None or key.revoked:
            raise Unauthenticated("invalid or revoked API key")
        return common_pb2.Caller(
            tenant_id=key.tenant_id, user_id=key.user_id, tier=key.tier, region=key.region
        )


def _request_id(context: Context) -> str:
    for name, value in context.invocation_metadata() or ():
        if name == "x-request-id" and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return new_request_id()


def _session_info(session: sessions_pb2.Session) -> edge_pb2.SessionInfo:
    return edge_pb2.SessionInfo(
        session_id=session.session_id,
        title=session.title,
        version=session.version,
        turns=session.counters.turns,
        tool_calls=session.counters.tool_calls,
        input_tokens=session.counters.input_tokens,
        output_tokens=session.counters.output_tokens,
        metadata=session.metadata,
        created_at=session.created_at,
        updated_at=session.updated_at,
    )


def _key_info(key: auth.ApiKey) -> edge_pb2.ApiKeyInfo:
    info = edge_pb2.ApiKeyInfo(
        key_id=key.key_id,
        tenant_id=key.tenant_id,
        user_id=key.user_id,
        tier=key.tier,
        region=key.region,
        revoked=key.revoked,
    )
    if key.created_at:
        info.created_at.CopyFrom(timestamp(key.created_at))
    return info


def _page(token: str, field: str) -> int:
    if not token:
        return 0
    try:
        offset = int(base64.urlsafe_b64decode(token.encode()).decode())
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(field, "is not a token returned by a previous call") from None
    if offset < 0:
        raise InvalidArgument(field, "is not a token returned by a previous call")
    return offset


def _page_size(size: int, field: str, maximum: int = 100) -> int:
    if size < 0:
        raise InvalidArgument(field, "must not be negative")
    return min(size or 20, maximum)


class EdgeServicer(edge_pb2_grpc.EdgeServiceServicer):
    def __init__(
        self,
        settings: EdgeSettings,
        keys: KeyRegistry,
        downstream: Downstream,
        pipeline: ChatPipeline,
        jobs: JobRunner,
        store: EdgeStore,
        metrics: EdgeMetrics,
        tools: ToolCalls,
        chat_lane: Lane | None = None,
        free_lane: Lane | None = None,
    ) -> None:
        # While the replica is short of CPU, normal priority chats take a slot in chat_lane and
        # low priority ones in free_lane, which gives way first (and sheds what would wait too
        # long); high and critical ones never wait (pacing.py).
        self._chat_lane = chat_lane
        self._free_lane = free_lane or chat_lane
        self._metrics = metrics
        self._settings = settings
        self._keys = keys
        self._down = downstream
        self._pipeline = pipeline
        self._jobs = jobs
        self._store = store
        self._tools = tools

    @asynccontextmanager
    async def _paced(self, caller: common_pb2.Caller, deadline: Deadline) -> AsyncIterator[None]:
        priority = self._settings.tier_priorities.get(caller.tier, "normal")
        lane = self._free_lane if priority == "low" else self._chat_lane
        if lane is None or priority not in ("low", "normal"):
            yield
            return
        wait = deadline.remaining()
        shed = priority == "low" and (wait is None or wait > self._settings.free_chat_max_wait)
        if shed:
            wait = self._settings.free_chat_max_wait
        try:
            async with asyncio.timeout(wait):
                await lane.acquire()
        except TimeoutError:
            if shed:
                raise ResourceExhausted(
                    "this replica is short of CPU and serves higher-priority chats first; retry shortly",
                    retry_after=max(1.0, self._settings.free_chat_max_wait),
                    reason="edge_overloaded",
                ) from None
            raise DeadlineExceeded(
                "the deadline passed while this replica served higher-priority chats first"
            ) from None
        try:
            yield
        finally:
            await lane.release()

    async def Chat(self, request: edge_pb2.ChatRequest, context: Context) -> edge_pb2.ChatResponse:
        started = time.perf_counter()
        caller = await self._keys.caller(context)
        deadline = Deadline(context.time_remaining())
        response = await self.chat(caller, request, _request_id(context), deadline, started=started)
        context.set_trailing_metadata(quota_metadata(list(response.quotas)))
        return response

    async def ChatStream(
        self, request: edge_pb2.ChatStreamRequest, context: Context
    ) -> AsyncIterator[edge_pb2.ChatStreamResponse]:
        started = time.perf_counter()
        caller = await self._keys.caller(context)
        deadline = Deadline(context.time_remaining())
        async for event in self.chat_stream(
            caller, request.chat, _request_id(context), deadline, "chat", started=started
        ):
            if event.WhichOneof("event") == "done":
                context.set_trailing_metadata(quota_metadata(list(event.done.quotas)))
            yield event

    # Both faces of the edge (this gRPC servicer and the OpenAI-compatible HTTP API) run a chat
    # turn through these two, so validation, pacing and metrics cannot drift apart. `started` is
    # when the call arrived (before authentication), for the latency metrics.

    async def chat(
        self,
        caller: common_pb2.Caller,
        request: edge_pb2.ChatRequest,
        request_id: str,
        deadline: Deadline,
        *,
        started: float | None = None,
    ) -> edge_pb2.ChatResponse:
        """One chat turn for an authenticated caller."""
        started = time.perf_counter() if started is None else started
        validate_chat(request, self._settings)
        try:
            async with self._paced(caller, deadline):
                response = await self._pipeline.chat(caller, request, request_id, deadline)
        except BallastError as exc:
            self._metrics.failed(caller, exc.code.name)
            self._metrics.timed(caller, failure_outcome(exc.code.name), time.perf_counter() - started)
            raise
        self._metrics.chat(caller, response)
        elapsed = time.perf_counter() - started
        self._metrics.timed(caller, "cache_hit" if response.cache_hit else "ok", elapsed)
        self._metrics.first_content(caller, "unary", elapsed)
        return response

    async def chat_stream(
        self,
        caller: common_pb2.Caller,
        request: edge_pb2.ChatRequest,
        request_id: str,
        deadline: Deadline,
        field: str = "",
        *,
        started: float | None = None,
    ) -> AsyncIterator[edge_pb2.ChatStreamResponse]:
        """One streamed chat turn for an authenticated caller; `field` prefixes validation errors."""
        started = time.perf_counter() if started is None else started
        validate_chat(request, self._settings, field)
        first = True
        try:
            async with self._paced(caller, deadline):
                async for event in self._pipeline.chat_stream(caller, request, request_id, deadline):
                    kind = event.WhichOneof("event")
                    if first and kind in ("delta", "done"):
                        first = False
                        self._metrics.first_content(caller, "stream", time.perf_counter() - started)
                    if kind == "done":
                        self._metrics.chat(caller, event.done)
                        outcome = "cache_hit" if event.done.cache_hit else "ok"
                        self._metrics.timed(caller, outcome, time.perf_counter() - started)
                    yield event
        except BallastError as exc:
            self._metrics.failed(caller, exc.code.name)
            self._metrics.timed(caller, failure_outcome(exc.code.name), time.perf_counter() - started)
            raise

    async def SubmitChat(
        self, request: edge_pb2.SubmitChatRequest, context: Context
    ) -> edge_pb2.SubmitChatResponse:
        caller = await self._keys.caller(context)
        validate_chat(request.chat, self._settings, "chat")
        if request.webhook_url:
            await self._jobs.vet_webhook(request.webhook_url)
        if len(request.idempotency_key) > 128:
            raise InvalidArgument("idempotency_key", "at most 128 characters")
        job = await self._jobs.submit(caller, request)
        return edge_pb2.SubmitChatResponse(job=job_to_proto(job))

    async def _own_job(self, job_id: str, context: Context) -> Any:
        caller = await self._keys.caller(context)
        check_id("job_id", job_id)
        job = await self._store.get_job(job_id)
        # A job belongs to the user who submitted it: another user's (of this tenant or another)
        # is reported as missing, so ids cannot be probed.
        if job is None or (job.tenant_id, job.user_id) != (caller.tenant_id, caller.user_id):
            raise NotFound(f"job {job_id!r} not found")
        return job

    async def GetJob(self, request: edge_pb2.GetJobRequest, context: Context) -> edge_pb2.GetJobResponse:
        job = await self._own_job(request.job_id, context)
        return edge_pb2.GetJobResponse(job=job_to_proto(job))

    async def CancelJob(
        self, request: edge_pb2.CancelJobRequest, context: Context
    ) -> edge_pb2.CancelJobResponse:
        await self._own_job(request.job_id, context)
        job = await self._store.cancel(request.job_id)
        if job is None:
            raise NotFound(f"job {request.job_id!r} not found")
        return edge_pb2.CancelJobResponse(job=job_to_proto(job))

    async def BeginToolCall(
        self, request: edge_pb2.BeginToolCallRequest, context: Context
    ) -> edge_pb2.BeginToolCallResponse:
        caller = await self._keys.caller(context)
        call = self._tool_call(request)
        admitted = await self._tools.begin(
            caller,
            call,
            use_cache=request.use_cache,
            request_id=_request_id(context),
            deadline=Deadline(context.time_remaining()),
        )
        response = edge_pb2.BeginToolCallResponse(
            tool_calls_used=admitted.used, tool_calls_limit=admitted.limit
        )
        if admitted.cached is not None:
            response.cache_hit = True
            response.cached_result = admitted.cached.result
            response.cached_is_error = admitted.cached.is_error
        return response

    async def RecordToolResult(
        self, request: edge_pb2.RecordToolResultRequest, context: Context
    ) -> edge_pb2.RecordToolResultResponse:
        caller = await self._keys.caller(context)
        call = self._tool_call(request)
        if len(request.result) > self._settings.max_content_chars:
            raise InvalidArgument("result", f"at most {self._settings.max_content_chars} characters")
        result = ToolResult(
            result=request.result,
            is_error=request.is_error,
            cacheable=request.cacheable,
            ttl=seconds(request.cache_ttl) if request.HasField("cache_ttl") else None,
        )
        version = await self._tools.record(caller, call, result, Deadline(context.time_remaining()))
        return edge_pb2.RecordToolResultResponse(session_version=version)

    def _tool_call(
        self, request: edge_pb2.BeginToolCallRequest | edge_pb2.RecordToolResultRequest
    ) -> ToolCall:
        check_id("session_id", request.session_id)
        check_id("tool_name", request.tool_name)
        check_json_object("arguments_json", request.arguments_json, max_depth=self._settings.max_json_depth)
        return ToolCall(
            session_id=request.session_id, tool_name=request.tool_name, arguments_json=request.arguments_json
        )

    async def CreateSession(
        self, request: edge_pb2.CreateSessionRequest, context: Context
    ) -> edge_pb2.CreateSessionResponse:
        caller = await self._keys.caller(context)
        check_id("session_id", request.session_id, required=False)
        reply = await self._down.call(
            "sessions",
            self._down.sessions.CreateSession,
            sessions_pb2.CreateSessionRequest(
                caller=caller, session_id=request.session_id, title=request.title, metadata=request.metadata
            ),
            self._down.timeout(Deadline(context.time_remaining()), caller),
        )
        return edge_pb2.CreateSessionResponse(session=_session_info(reply.session))

    async def GetSession(
        self, request: edge_pb2.GetSessionRequest, context: Context
    ) -> edge_pb2.GetSessionResponse:
        caller = await self._keys.caller(context)
        check_id("session_id", request.session_id)
        reply = await self._down.call(
            "sessions",
            self._down.sessions.GetSession,
            sessions_pb2.GetSessionRequest(caller=caller, session_id=request.session_id),
            self._down.timeout(Deadline(context.time_remaining()), caller),
        )
        return edge_pb2.GetSessionResponse(session=_session_info(reply.session))

    async def ListSessions(
        self, request: edge_pb2.ListSessionsRequest, context: Context
    ) -> edge_pb2.ListSessionsResponse:
        caller = await self._keys.caller(context)
        if request.page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        reply = await self._down.call(
            "sessions",
            self._down.sessions.ListSessions,
            sessions_pb2.ListSessionsRequest(
                caller=caller, page_size=request.page_size, page_token=request.page_token
            ),
            self._down.timeout(Deadline(context.time_remaining()), caller),
        )
        return edge_pb2.ListSessionsResponse(
            sessions=[_session_info(s) for s in reply.sessions], next_page_token=reply.next_page_token
        )

    async def DeleteSession(
        self, request: edge_pb2.DeleteSessionRequest, context: Context
    ) -> edge_pb2.DeleteSessionResponse:
        caller = await self._keys.caller(context)
        check_id("session_id", request.session_id)
        await self._down.call(
            "sessions",
            self._down.sessions.DeleteSession,
            sessions_pb2.DeleteSessionRequest(caller=caller, session_id=request.session_id),
            self._down.timeout(Deadline(context.time_remaining()), caller),
        )
        return edge_pb2.DeleteSessionResponse()

    async def GetUsage(
        self, request: edge_pb2.GetUsageRequest, context: Context
    ) -> edge_pb2.GetUsageResponse:
        caller = await self._keys.caller(context)
        reply = await self._down.call(
            "limiter",
            self._down.limiter.GetUsage,
            limiter_pb2.GetUsageRequest(caller=caller),
            self._down.timeout(Deadline(context.time_remaining()), caller),
        )
        return edge_pb2.GetUsageResponse(
            tokens_today=reply.tokens_today,
            cost_micros_today=reply.cost_micros_today,
            quotas=reply.quotas,
            tier=caller.tier,
        )


class EdgeAdminServicer(edge_pb2_grpc.EdgeAdminServiceServicer):
    def __init__(self, settings: EdgeSettings, store: EdgeStore, file_keys: list[auth.ApiKey]) -> None:
        self._settings = settings
        self._store = store
        self._file_keys = {key.key_id: key for key in file_keys}

    def _admin(self, context: Context) -> None:
        auth.check_admin(context.invocation_metadata(), self._settings.admin_key)

    async def CreateApiKey(
        self, request: edge_pb2.CreateApiKeyRequest, context: Context
    ) -> edge_pb2.CreateApiKeyResponse:
        self._admin(context)
        check_id("tenant_id", request.tenant_id)
        check_id("user_id", request.user_id)
        check_id("tier", request.tier)
        check_id("region", request.region, required=False)
        key, secret = auth.new_key(request.tenant_id, request.user_id, request.tier, request.region)
        await self._store.put_key(key)
        return edge_pb2.CreateApiKeyResponse(key=_key_info(key), api_key=secret)

    async def RevokeApiKey(
        self, request: edge_pb2.RevokeApiKeyRequest, context: Context
    ) -> edge_pb2.RevokeApiKeyResponse:
        self._admin(context)
        check_id("key_id", request.key_id)
        if request.key_id in self._file_keys:
            raise InvalidArgument(
                "key_id", "keys from the keys file are revoked by removing them from the file"
            )
        key = await self._store.key_by_id(request.key_id)
        if key is None:
            raise NotFound(f"key {request.key_id!r} not found")
        key = auth.revoked(key)
        await self._store.put_key(key)
        return edge_pb2.RevokeApiKeyResponse(key=_key_info(key))

    async def ListApiKeys(
        self, request: edge_pb2.ListApiKeysRequest, context: Context
    ) -> edge_pb2.ListApiKeysResponse:
        self._admin(context)
        check_id("tenant_id", request.tenant_id, required=False)
        size = _page_size(request.page_size, "page_size")
        offset = _page(request.page_token, "page_token")
        file_keys = sorted(
            (
                k
                for k in self._file_keys.values()
                if not request.tenant_id or k.tenant_id == request.tenant_id
            ),
            key=lambda k: k.key_id,
        )
        stored = await self._store.list_keys(request.tenant_id, 0, offset + size + 1)
        everything = [*file_keys, *stored]
        page = everything[offset : offset + size]
        more = len(everything) > offset + size
        token = base64.urlsafe_b64encode(str(offset + size).encode()).decode() if more else ""
        return edge_pb2.ListApiKeysResponse(keys=[_key_info(k) for k in page], next_page_token=token)


class InFlightLimit(AroundInterceptor):
    """Caps concurrent EdgeService calls on this replica; beyond it, RESOURCE_EXHAUSTED at once.

    Shedding at the door keeps latency bounded for the calls already admitted, and tells
    clients (and load balancers) to retry elsewhere or later.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.active = 0

    def around(self, method: str) -> Around | None:
        return self._admitted if method.startswith("/ballast.edge.v1.EdgeService/") else None

    @asynccontextmanager
    async def _admitted(self, context: Context) -> AsyncIterator[None]:
        if self.active >= self.limit:
            await abort_with(
                context,
                ResourceExhausted(
                    f"this edge replica is at its limit of {self.limit} requests in flight; retry shortly",
                    retry_after=0.5,
                    reason="edge_in_flight",
                ),
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
