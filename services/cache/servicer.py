"""ballast.cache.v1.CacheService over gRPC: validate, call the engine, build the response."""

from __future__ import annotations

import json
from typing import Any

import grpc
from ballast.cache.v1 import cache_pb2, cache_pb2_grpc
from ballast.common.v1 import common_pb2
from google.protobuf import duration_pb2
from opentelemetry import metrics

from services.cache.cache import TIER_EXACT, Answer, CacheEngine, LookupResult
from services.cache.keys import (
    ChatRequest,
    Message,
    Params,
    ScopeId,
    ToolCallData,
    ToolSchema,
    canonical_json,
)
from services.kit.errors import InvalidArgument
from services.kit.protos import duration, seconds, timestamp

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_NAMESPACE = "default"
MAX_ID_CHARS = 256

_ROLES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_TOOL: "tool",
}
_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length (truncated)",
    common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
    common_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
    common_pb2.FINISH_REASON_ERROR: "error",
    common_pb2.FINISH_REASON_UNSPECIFIED: "unspecified",
}


def _scope(request: Any, *, namespace_default: str | None = DEFAULT_NAMESPACE) -> ScopeId:
    if not request.HasField("scope") or not request.scope.tenant_id:
        raise InvalidArgument("scope.tenant_id", "required")
    scope = request.scope
    for name in ("tenant_id", "user_id", "namespace"):
        value = getattr(scope, name)
        if len(value) > MAX_ID_CHARS:
            raise InvalidArgument(f"scope.{name}", f"at most {MAX_ID_CHARS} characters")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            # Store keys join these with a control character; keep them unambiguous.
            raise InvalidArgument(f"scope.{name}", "must not contain control characters")
    namespace = scope.namespace or namespace_default or ""
    return ScopeId(tenant_id=scope.tenant_id, user_id=scope.user_id, namespace=namespace)


def _seconds(request: Any, field: str) -> float | None:
    if not request.HasField(field):
        return None
    value: duration_pb2.Duration = getattr(request, field)
    length = seconds(value)
    if length < 0:
        raise InvalidArgument(field, "must not be negative")
    return length


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, engine: CacheEngine, meter: metrics.Meter | None = None) -> None:
        self.engine = engine
        meter = meter or metrics.NoOpMeter("ballast")
        self._lookups = meter.create_counter(
            "ballast.cache.lookups",
            unit="{request}",
            description="Cache lookups by result (exact, semantic, miss)",
        )
        self._stores = meter.create_counter(
            "ballast.cache.stores", unit="{request}", description="Store calls by result (stored, refused)"
        )
        self.max_messages = engine.settings.max_messages
        self.max_chars = engine.settings.max_text_chars

    # --- conversion -----------------------------------------------------------

    def _chat(self, request: Any) -> ChatRequest:
        scope = _scope(request)
        if not request.model:
            raise InvalidArgument("model", "required")
        if not request.messages:
            raise InvalidArgument("messages", "at least one message is required")
        if len(request.messages) > self.max_messages:
            raise InvalidArgument("messages", f"at most {self.max_messages} messages")
        messages = []
        total = 0
        for i, m in enumerate(request.messages):
            role = _ROLES.get(m.role)
            if role is None:
                raise InvalidArgument(
                    f"messages[{i}].role", "must be one of ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL"
                )
            total += len(m.content)
            if total > self.max_chars:
                raise InvalidArgument(
                    f"messages[{i}].content", f"the messages exceed {self.max_chars} characters"
                )
            messages.append(
                Message(
                    role=role,
                    content=m.content,
                    name=m.name,
                    # Most turns carry no tool calls: no generator for them (a session's window
                    # is converted on every Lookup and Store).
                    tool_calls=tuple(ToolCallData(c.id, c.name, c.arguments_json) for c in m.tool_calls)
                    if m.tool_calls
                    else (),
                    tool_call_id=m.tool_call_id,
                    is_error=m.is_error,
                )
            )
        tools = []
        for i, t in enumerate(request.tools):
            if not t.name:
                raise InvalidArgument(f"tools[{i}].name", "required")
            tools.append(ToolSchema(t.name, t.description, t.parameters_json_schema))
        p = request.params
        params = Params(
            temperature=p.temperature if p.HasField("temperature") else None,
            top_p=p.top_p if p.HasField("top_p") else None,
            max_output_tokens=p.max_output_tokens,
            stop=tuple(p.stop),
            seed=p.seed if p.HasField("seed") else None,
        )
        if params.temperature is not None and params.temperature < 0:
            raise InvalidArgument("params.temperature", "must not be negative")
        return ChatRequest(
            scope=scope, model=request.model, messages=tuple(messages), tools=tuple(tools), params=params
        )

    # --- answers ----------------------------------------------------------------

    async def Lookup(self, request: cache_pb2.LookupRequest, context: Context) -> cache_pb2.LookupResponse:
        chat = self._chat(request)
        if not 0.0 <= request.threshold <= 1.0:
            raise InvalidArgument("threshold", "must be from 0 to 1 (0 uses the namespace's threshold)")
        result = await self.engine.lookup(
            chat,
            semantic=request.semantic,
            allow_nondeterministic=request.allow_nondeterministic,
            threshold=request.threshold,
        )
        self._lookups.add(1, {"result": result.tier if result.hit else "miss"})
        return self._lookup_response(result)

    @staticmethod
    def _lookup_response(result: LookupResult) -> cache_pb2.LookupResponse:
        if not result.hit or result.entry is None:
            return cache_pb2.LookupResponse(
                hit=False, similarity=result.similarity, miss_reason=result.miss_reason
            )
        answer = cache_pb2.CachedAnswer.FromString(result.entry.payload)
        answer.created_at.CopyFrom(timestamp(result.entry.created_at))
        tier = cache_pb2.HIT_TIER_EXACT if result.tier == TIER_EXACT else cache_pb2.HIT_TIER_SEMANTIC
        return cache_pb2.LookupResponse(
            hit=True, tier=tier, similarity=result.similarity, entry_id=result.entry.id, answer=answer
        )

    async def Store(self, request: cache_pb2.StoreRequest, context: Context) -> cache_pb2.StoreResponse:
        chat = self._chat(request)
        if not request.HasField("answer") or not request.answer.HasField("message"):
            raise InvalidArgument("answer.message", "required")
        ttl = _seconds(request, "ttl")
        for key in request.attributes:
            if not key:
                raise InvalidArgument("attributes", "keys must not be empty")
        answer = request.answer
        stored_answer = cache_pb2.CachedAnswer()
        stored_answer.CopyFrom(answer)
        if not stored_answer.model:
            stored_answer.model = request.model
        stored_answer.ClearField("created_at")
        result = await self.engine.store_answer(
            chat,
            Answer(
                payload=stored_answer.SerializeToString(),
                finish_reason=_FINISH.get(answer.finish_reason, "unspecified"),
                has_tool_calls=len(answer.message.tool_calls) > 0,
                content=answer.message.content,
            ),
            ttl=ttl,
            attributes=dict(request.attributes),
            allow_nondeterministic=request.allow_nondeterministic,
            semantic=not request.exact_only,
        )
        self._stores.add(1, {"result": "stored" if result.stored else "refused"})
        return cache_pb2.StoreResponse(
            stored=result.stored, entry_id=result.entry_id, not_stored_reason=result.not_stored_reason
        )

    # --- tools ------------------------------------------------------------------

    @staticmethod
    def _tool_args(request: Any) -> None:
        if not request.tool_name:
            raise InvalidArgument("tool_name", "required")
        try:
            canonical_json(request.arguments_json)
        except ValueError as exc:
            raise InvalidArgument("arguments_json", f"not valid JSON ({exc})") from exc

    async def GetToolResult(
        self, request: cache_pb2.GetToolResultRequest, context: Context
    ) -> cache_pb2.GetToolResultResponse:
        scope = _scope(request)
        self._tool_args(request)
        found = await self.engine.get_tool(scope, request.tool_name, request.arguments_json)
        if found is None:
            return cache_pb2.GetToolResultResponse(hit=False)
        data = json.loads(found.payload)
        remaining = duration(max(0.0, found.expires_at - self.engine.clock()))
        return cache_pb2.GetToolResultResponse(
            hit=True,
            result=data["result"],
            is_error=data["is_error"],
            created_at=timestamp(found.created_at),
            remaining_ttl=remaining,
        )

    async def PutToolResult(
        self, request: cache_pb2.PutToolResultRequest, context: Context
    ) -> cache_pb2.PutToolResultResponse:
        scope = _scope(request)
        self._tool_args(request)
        ttl = _seconds(request, "ttl")
        payload = json.dumps({"result": request.result, "is_error": request.is_error}).encode()
        stored = await self.engine.put_tool(
            scope, request.tool_name, request.arguments_json, payload, ttl, is_error=request.is_error
        )
        return cache_pb2.PutToolResultResponse(stored=stored)

    # --- retrieval ----------------------------------------------------------------

    @staticmethod
    def _retrieval_args(request: Any) -> None:
        if not request.index_name:
            raise InvalidArgument("index_name", "required")
        if not request.query:
            raise InvalidArgument("query", "required")
        if request.top_k < 0:
            raise InvalidArgument("top_k", "must not be negative")

    async def GetRetrieval(
        self, request: cache_pb2.GetRetrievalRequest, context: Context
    ) -> cache_pb2.GetRetrievalResponse:
        scope = _scope(request)
        self._retrieval_args(request)
        found, version = await self.engine.get_retrieval(
            scope, request.index_name, request.index_version, request.query, request.top_k
        )
        if found is None:
            return cache_pb2.GetRetrievalResponse(hit=False, index_version=version)
        reply = cache_pb2.GetRetrievalResponse.FromString(found.payload)
        reply.hit = True
        reply.index_version = version
        return reply

    async def PutRetrieval(
        self, request: cache_pb2.PutRetrievalRequest, context: Context
    ) -> cache_pb2.PutRetrievalResponse:
        scope = _scope(request)
        self._retrieval_args(request)
        ttl = _seconds(request, "ttl")
        payload = cache_pb2.GetRetrievalResponse(documents=request.documents).SerializeToString()
        stored, version = await self.engine.put_retrieval(
            scope, request.index_name, request.index_version, request.query, request.top_k, payload, ttl
        )
        return cache_pb2.PutRetrievalResponse(stored=stored, index_version=version)

    async def BumpIndexVersion(
        self, request: cache_pb2.BumpIndexVersionRequest, context: Context
    ) -> cache_pb2.BumpIndexVersionResponse:
        scope = _scope(request)
        if not request.index_name:
            raise InvalidArgument("index_name", "required")
        return cache_pb2.BumpIndexVersionResponse(
            index_version=await self.engine.bump_version(scope, request.index_name)
        )

    # --- lifecycle ------------------------------------------------------------------

    async def Delete(self, request: cache_pb2.DeleteRequest, context: Context) -> cache_pb2.DeleteResponse:
        selector = request.WhichOneof("selector")
        if selector == "all_in_namespace":
            if not request.all_in_namespace:
                raise InvalidArgument("all_in_namespace", "must be true when set")
            scope = _scope(request)
            deleted = await self.engine.delete_namespace(scope.tenant_id, scope.namespace)
        elif selector == "entry_id":
            scope = _scope(request)
            if not request.entry_id:
                raise InvalidArgument("entry_id", "must not be empty")
            deleted = await self.engine.delete_entry(scope.tenant_id, request.entry_id)
        elif selector == "attribute":
            # An empty namespace deletes across all of the tenant's namespaces.
            scope = _scope(request, namespace_default=None)
            if not request.attribute.key:
                raise InvalidArgument("attribute.key", "required")
            deleted = await self.engine.delete_attribute(
                scope.tenant_id, scope.namespace or None, request.attribute.key, request.attribute.value
            )
        else:
            _scope(request)
            raise InvalidArgument("selector", "set one of all_in_namespace, entry_id, attribute")
        return cache_pb2.DeleteResponse(deleted=deleted)

    async def GetStats(
        self, request: cache_pb2.GetStatsRequest, context: Context
    ) -> cache_pb2.GetStatsResponse:
        scope = _scope(request, namespace_default=None)
        stats = await self.engine.stats(scope.tenant_id, scope.namespace or None)
        return cache_pb2.GetStatsResponse(
            namespaces=[
                cache_pb2.NamespaceStats(
                    namespace=s.namespace,
                    lookups=s.lookups,
                    exact_hits=s.exact_hits,
                    semantic_hits=s.semantic_hits,
                    guard_rejections=s.guard_rejections,
                    entries=s.entries,
                    bytes=s.bytes,
                    evictions=s.evictions,
                )
                for s in stats
            ]
        )
