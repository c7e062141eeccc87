"""Tool calls an agent runs itself, gated and cached by the suite.

Before a tool runs, the session must be the caller's, the session's tool-call cap is charged
at the limiter, and (when asked) a fresh cached result for the same tool and arguments is
offered instead of running it. After it ran, a cacheable result is kept for the next caller
of the same tenant and user. A cache outage never stops a tool: the tool runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ballast.cache.v1 import cache_pb2
from ballast.common.v1 import common_pb2
from ballast.limiter.v1 import limiter_pb2
from ballast.sessions.v1 import sessions_pb2

from services.edge.downstream import Deadline, Downstream
from services.edge.edge import quota_metadata
from services.kit.errors import BallastError, ResourceExhausted
from services.kit.protos import duration, seconds

log = logging.getLogger("ballast.edge.tools")


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call of a tool in a session: what makes two calls the same for the cache."""

    session_id: str
    tool_name: str
    arguments_json: str

    def scope_request(self, caller: common_pb2.Caller) -> tuple[cache_pb2.Scope, str]:
        scope = cache_pb2.Scope(tenant_id=caller.tenant_id, user_id=caller.user_id)
        return scope, self.arguments_json or "{}"


@dataclass(frozen=True, slots=True)
class CachedResult:
    result: str
    is_error: bool


@dataclass(frozen=True, slots=True)
class Admitted:
    """A tool call the session's cap allows: the cap's use so far, and a cached result if one is fresh."""

    used: int
    limit: int
    cached: CachedResult | None = None


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What a tool returned. `ttl` None uses the tool's configured TTL; 0 keeps it out of the cache."""

    result: str
    is_error: bool = False
    cacheable: bool = False
    ttl: float | None = None


class ToolCalls:
    """BeginToolCall and RecordToolResult of the edge, over the sessions, limiter and cache."""

    def __init__(self, downstream: Downstream) -> None:
        self._down = downstream

    async def begin(
        self,
        caller: common_pb2.Caller,
        call: ToolCall,
        *,
        use_cache: bool,
        request_id: str,
        deadline: Deadline,
    ) -> Admitted:
        """Charges the session's tool-call cap; raises ResourceExhausted when it is spent."""
        # The session must be the caller's before its cap is counted.
        await self._session(caller, call.session_id, deadline)
        used, limit = await self._charge(caller, call.session_id, request_id, deadline)
        cached = await self._cached(caller, call, deadline) if use_cache else None
        return Admitted(used=used, limit=limit, cached=cached)

    async def record(
        self, caller: common_pb2.Caller, call: ToolCall, result: ToolResult, deadline: Deadline
    ) -> int:
        """Keeps a cacheable, successful result; returns the session's version."""
        session = await self._session(caller, call.session_id, deadline)
        if result.cacheable and not result.is_error and result.ttl != 0:
            scope, arguments = call.scope_request(caller)
            put = cache_pb2.PutToolResultRequest(
                scope=scope,
                tool_name=call.tool_name,
                arguments_json=arguments,
                result=result.result,
                is_error=result.is_error,
            )
            if result.ttl is not None:
                put.ttl.CopyFrom(duration(result.ttl))
            await self._down.call(
                "cache", self._down.cache.PutToolResult, put, self._down.timeout(deadline, caller)
            )
        return session.session.version

    async def _session(
        self, caller: common_pb2.Caller, session_id: str, deadline: Deadline
    ) -> sessions_pb2.GetSessionResponse:
        return await self._down.call(
            "sessions",
            self._down.sessions.GetSession,
            sessions_pb2.GetSessionRequest(caller=caller, session_id=session_id),
            self._down.timeout(deadline, caller),
        )

    async def _charge(
        self, caller: common_pb2.Caller, session_id: str, request_id: str, deadline: Deadline
    ) -> tuple[int, int]:
        """One tool call against the session's cap: (used, limit), or ResourceExhausted."""
        check = await self._down.call(
            "limiter",
            self._down.limiter.Check,
            limiter_pb2.CheckRequest(
                caller=caller, session_id=session_id, requests=0, tool_calls=1, request_id=request_id
            ),
            self._down.timeout(deadline, caller),
        )
        used, limit = 0, 0
        for status in check.limits:
            if "tool" in status.quota.name:
                limit = status.quota.limit
                used = max(0, status.quota.limit - status.quota.remaining)
        if check.decision == limiter_pb2.DECISION_DENY:
            error = ResourceExhausted(
                f"tool-call cap reached for session {session_id!r}: {used} of {limit} used",
                retry_after=seconds(check.retry_after) or None,
                reason=check.reason or "tool_calls_per_session",
            )
            error.trailing = quota_metadata([s.quota for s in check.limits])
            raise error
        return used, limit

    async def _cached(
        self, caller: common_pb2.Caller, call: ToolCall, deadline: Deadline
    ) -> CachedResult | None:
        scope, arguments = call.scope_request(caller)
        try:
            cached = await self._down.call(
                "cache",
                self._down.cache.GetToolResult,
                cache_pb2.GetToolResultRequest(
                    scope=scope, tool_name=call.tool_name, arguments_json=arguments
                ),
                self._down.timeout(deadline, caller),
            )
        except BallastError as exc:
            # Downstream.call reports every failure of the cache as a BallastError (down, timed
            # out, or a status of its own): the tool runs. Anything else is a bug in the edge and
            # surfaces as INTERNAL.
            log.warning("tool-result lookup failed, the tool runs: %s", exc.message)
            return None
        if not cached.hit:
            return None
        return CachedResult(result=cached.result, is_error=cached.is_error)
