"""ballast.limiter.v1.LimiterService: validate, call the limiter, build the response."""

from __future__ import annotations

from typing import Any

import grpc
from ballast.common.v1 import common_pb2
from ballast.limiter.v1 import limiter_pb2, limiter_pb2_grpc
from google.protobuf import duration_pb2

from services.kit.errors import InvalidArgument, Unavailable
from services.kit.protos import duration_fields, seconds
from services.limiter.config import LimiterSettings
from services.limiter.limiter import ALLOWED, DELAYED, CheckInput, Limiter, LimitState
from services.limiter.store.base import StoreUnavailableError
from services.limiter.tiers import PRIORITY_RANK

_DECISIONS = {
    ALLOWED: limiter_pb2.DECISION_ALLOW,
    DELAYED: limiter_pb2.DECISION_DELAY,
}
_PRIORITY_NAMES = {rank: name for name, rank in PRIORITY_RANK.items()}

Context = grpc.aio.ServicerContext[Any, Any]


def _duration_fields(seconds: float) -> dict[str, int]:
    return duration_fields(max(0.0, seconds))  # a reset or a delay is never negative on the wire


def duration(seconds: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(**_duration_fields(seconds))


def quota_fields(state: LimitState) -> dict[str, Any]:
    """A Quota as constructor fields: nested messages given as dicts are built in place, where
    message objects would be built and then copied (every Check returns one per limit)."""
    return {
        "name": state.name,
        "limit": state.limit,
        "remaining": max(0, state.remaining),
        "reset_after": _duration_fields(state.reset_after),
        "unlimited": state.unlimited,
    }


def quota(state: LimitState) -> common_pb2.Quota:
    return common_pb2.Quota(**quota_fields(state))


class Validator:
    def __init__(self, settings: LimiterSettings) -> None:
        self.s = settings

    def text(self, value: str, field: str, *, required: bool) -> str:
        if required and not value:
            raise InvalidArgument(field, "is required")
        if len(value) > self.s.max_id_length:
            raise InvalidArgument(field, f"is longer than {self.s.max_id_length} characters")
        return value

    def count(self, value: int, field: str, maximum: int) -> int:
        if value < 0:
            raise InvalidArgument(field, "must not be negative")
        if value > maximum:
            raise InvalidArgument(field, f"must be at most {maximum}")
        return value

    def caller(self, caller: common_pb2.Caller, field: str = "caller") -> tuple[str, str, str]:
        return (
            self.text(caller.tenant_id, f"{field}.tenant_id", required=True),
            self.text(caller.user_id, f"{field}.user_id", required=True),
            self.text(caller.tier, f"{field}.tier", required=False),
        )


class LimiterServicer(limiter_pb2_grpc.LimiterServiceServicer):
    def __init__(self, limiter: Limiter, settings: LimiterSettings) -> None:
        self.limiter = limiter
        self.v = Validator(settings)
        self.s = settings

    async def Check(self, request: limiter_pb2.CheckRequest, context: Context) -> limiter_pb2.CheckResponse:
        v = self.v
        tenant, user, tier = v.caller(request.caller)
        requests = v.count(request.requests, "requests", self.s.max_requests)
        tokens = v.count(request.reserve_tokens, "reserve_tokens", self.s.max_tokens)
        tools = v.count(request.tool_calls, "tool_calls", self.s.max_tool_calls)
        if requests == 0 and tokens == 0 and tools == 0:
            raise InvalidArgument(
                "requests", "at least one of requests, reserve_tokens, tool_calls must be positive"
            )
        session = v.text(request.session_id, "session_id", required=tools > 0)
        priority = ""
        if request.priority:
            if request.priority not in _PRIORITY_NAMES:
                raise InvalidArgument("priority", f"unknown priority {request.priority}")
            priority = _PRIORITY_NAMES[request.priority]
        result = await self.limiter.check(
            CheckInput(
                tenant=tenant,
                user=user,
                tier=tier,
                session_id=session,
                requests=requests,
                reserve_tokens=tokens,
                tool_calls=tools,
                priority=priority,
                provider=v.text(request.provider, "provider", required=False),
                request_id=v.text(request.request_id, "request_id", required=False),
            )
        )
        response = limiter_pb2.CheckResponse(
            decision=_DECISIONS.get(result.decision, limiter_pb2.DECISION_DENY),
            reason=result.reason,
            reservation_id=result.reservation_id,
            priority=PRIORITY_RANK[result.priority],  # type: ignore[arg-type]
            degraded=result.degraded,
            replayed=result.replayed,
        )
        add_limit = response.limits.add
        for state in result.limits:
            add_limit(quota=quota_fields(state), over_limit=state.over, shadow=state.shadow)
        if result.decision == DELAYED:
            response.delay.CopyFrom(duration(result.delay))
        elif result.decision != ALLOWED:
            response.retry_after.CopyFrom(duration(result.retry_after))
        return response

    async def Commit(
        self, request: limiter_pb2.CommitRequest, context: Context
    ) -> limiter_pb2.CommitResponse:
        v = self.v
        tenant, user, tier = v.caller(request.caller)
        rid = v.text(request.reservation_id, "reservation_id", required=False)
        actual = v.count(request.actual_tokens, "actual_tokens", self.s.max_tokens)
        if request.cost_micros < 0:
            raise InvalidArgument("cost_micros", "must not be negative")
        try:
            result = await self.limiter.commit(tenant, user, tier, rid, actual, request.cost_micros)
        except StoreUnavailableError as exc:
            raise Unavailable(f"limiter store unavailable: {exc}") from exc
        return limiter_pb2.CommitResponse(
            budgets=[quota(s) for s in result.budgets],
            reservation_found=result.reservation_found,
            already_settled=result.already_settled,
            degraded=result.degraded,
        )

    async def ReportHeadroom(
        self, request: limiter_pb2.ReportHeadroomRequest, context: Context
    ) -> limiter_pb2.ReportHeadroomResponse:
        v = self.v
        provider = v.text(request.provider, "provider", required=True)
        model = v.text(request.model, "model", required=False)
        for field in ("remaining_requests", "remaining_tokens", "limit_requests", "limit_tokens"):
            if getattr(request, field) < -1:
                raise InvalidArgument(field, "must be -1 (not reported) or a non-negative count")
        for field in ("reset_requests", "reset_tokens", "retry_after"):
            if seconds(getattr(request, field)) < 0:
                raise InvalidArgument(field, "must not be negative")
        await self.limiter.report_headroom(
            provider,
            model,
            remaining_requests=request.remaining_requests,
            remaining_tokens=request.remaining_tokens,
            limit_requests=request.limit_requests,
            limit_tokens=request.limit_tokens,
            reset_requests=seconds(request.reset_requests),
            reset_tokens=seconds(request.reset_tokens),
            rate_limited=request.rate_limited,
            retry_after=seconds(request.retry_after),
        )
        return limiter_pb2.ReportHeadroomResponse()

    async def GetUsage(
        self, request: limiter_pb2.GetUsageRequest, context: Context
    ) -> limiter_pb2.GetUsageResponse:
        tenant, user, tier = self.v.caller(request.caller)
        session = self.v.text(request.session_id, "session_id", required=False)
        usage = await self.limiter.usage(tenant, user, tier, session)
        return limiter_pb2.GetUsageResponse(
            quotas=[quota(s) for s in usage.quotas],
            tokens_today=usage.tokens_today,
            cost_micros_today=usage.cost_micros_today,
        )
