"""RouterService over gRPC: validate the request, run it through the gateway, build the response."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from ballast.common.v1 import common_pb2
from ballast.router.v1 import router_pb2, router_pb2_grpc
from google.protobuf import duration_pb2

from services.kit.errors import InvalidArgument
from services.kit.protos import duration, timestamp
from services.router.catalog import Catalog, Strategy
from services.router.coalesce import coalesce_text
from services.router.config import RouterSettings
from services.router.health import BreakerState, HealthBook
from services.router.model import (
    ChatRequest,
    Delta,
    Finish,
    Message,
    Params,
    Role,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
)
from services.router.providers.base import Outcome
from services.router.router import Answer, AttemptRecord, Call, Gateway, StreamStarted
from services.router.routing import Hints, Planner

_ROLES = {
    common_pb2.ROLE_SYSTEM: Role.SYSTEM,
    common_pb2.ROLE_USER: Role.USER,
    common_pb2.ROLE_ASSISTANT: Role.ASSISTANT,
    common_pb2.ROLE_TOOL: Role.TOOL,
}
_CHOICES = {
    common_pb2.TOOL_CHOICE_MODE_UNSPECIFIED: ToolChoiceMode.UNSPECIFIED,
    common_pb2.TOOL_CHOICE_MODE_AUTO: ToolChoiceMode.AUTO,
    common_pb2.TOOL_CHOICE_MODE_NONE: ToolChoiceMode.NONE,
    common_pb2.TOOL_CHOICE_MODE_REQUIRED: ToolChoiceMode.REQUIRED,
    common_pb2.TOOL_CHOICE_MODE_NAMED: ToolChoiceMode.NAMED,
}
_STRATEGIES = {
    router_pb2.ROUTING_STRATEGY_ORDERED: Strategy.ORDERED,
    router_pb2.ROUTING_STRATEGY_WEIGHTED: Strategy.WEIGHTED,
    router_pb2.ROUTING_STRATEGY_LOWEST_LATENCY: Strategy.LOWEST_LATENCY,
    router_pb2.ROUTING_STRATEGY_LOWEST_COST: Strategy.LOWEST_COST,
}
_STRATEGY_PB = {v: k for k, v in _STRATEGIES.items()}
_FINISH = {
    Finish.UNSPECIFIED: common_pb2.FINISH_REASON_UNSPECIFIED,
    Finish.STOP: common_pb2.FINISH_REASON_STOP,
    Finish.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    Finish.TOOL_CALLS: common_pb2.FINISH_REASON_TOOL_CALLS,
    Finish.CONTENT_FILTER: common_pb2.FINISH_REASON_CONTENT_FILTER,
    Finish.ERROR: common_pb2.FINISH_REASON_ERROR,
}
_OUTCOMES = {
    Outcome.OK: router_pb2.ATTEMPT_OUTCOME_OK,
    Outcome.RATE_LIMITED: router_pb2.ATTEMPT_OUTCOME_RATE_LIMITED,
    Outcome.SERVER_ERROR: router_pb2.ATTEMPT_OUTCOME_SERVER_ERROR,
    Outcome.TIMEOUT: router_pb2.ATTEMPT_OUTCOME_TIMEOUT,
    Outcome.CONNECTION_ERROR: router_pb2.ATTEMPT_OUTCOME_CONNECTION_ERROR,
    Outcome.CLIENT_ERROR: router_pb2.ATTEMPT_OUTCOME_CLIENT_ERROR,
    Outcome.BREAKER_OPEN: router_pb2.ATTEMPT_OUTCOME_BREAKER_OPEN,
    Outcome.PROTOCOL_ERROR: router_pb2.ATTEMPT_OUTCOME_PROTOCOL_ERROR,
    Outcome.AUTH_ERROR: router_pb2.ATTEMPT_OUTCOME_AUTH_ERROR,
    Outcome.QUOTA_EXHAUSTED: router_pb2.ATTEMPT_OUTCOME_QUOTA_EXHAUSTED,
    Outcome.OUT_OF_ROTATION: router_pb2.ATTEMPT_OUTCOME_OUT_OF_ROTATION,
}
_BREAKER = {
    BreakerState.CLOSED: router_pb2.BREAKER_STATE_CLOSED,
    BreakerState.OPEN: router_pb2.BREAKER_STATE_OPEN,
    BreakerState.HALF_OPEN: router_pb2.BREAKER_STATE_HALF_OPEN,
}
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_EMBED_INPUTS = 2048
MAX_ATTEMPTS_HINT = 20


def _duration(seconds: float) -> duration_pb2.Duration:
    return duration(max(0.0, seconds))  # a latency or a reset is never negative on the wire


# --- request translation ------------------------------------------------------------------------


def to_chat_request(request: router_pb2.CompleteRequest) -> ChatRequest:
    if not request.messages:
        raise InvalidArgument("messages", "at least one message is required")
    messages: list[Message] = []
    for index, m in enumerate(request.messages):
        field = f"messages[{index}]"
        role = _ROLES.get(m.role)
        if role is None:
            raise InvalidArgument(
                f"{field}.role", "must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL"
            )
        if role is Role.TOOL and not m.tool_call_id:
            raise InvalidArgument(
                f"{field}.tool_call_id", "a ROLE_TOOL message must name the tool call it answers"
            )
        if m.tool_calls and role is not Role.ASSISTANT:
            raise InvalidArgument(f"{field}.tool_calls", "only ROLE_ASSISTANT messages carry tool calls")
        if role is not Role.ASSISTANT and not m.content and role is not Role.TOOL:
            raise InvalidArgument(f"{field}.content", "must not be empty")
        calls = []
        for j, call in enumerate(m.tool_calls):
            if not call.name:
                raise InvalidArgument(f"{field}.tool_calls[{j}].name", "must not be empty")
            calls.append(ToolCall(call.id, call.name, call.arguments_json or "{}"))
        messages.append(Message(role, m.content, m.name, tuple(calls), m.tool_call_id, m.is_error))
    if all(m.role is Role.SYSTEM for m in messages):
        raise InvalidArgument("messages", "needs at least one message that is not ROLE_SYSTEM")
    tools: list[Tool] = []
    for index, t in enumerate(request.tools):
        field = f"tools[{index}]"
        if not _TOOL_NAME.match(t.name):
            raise InvalidArgument(f"{field}.name", "letters, digits, '_' and '-', 1 to 64 characters")
        schema: Any = {}
        if t.parameters_json_schema:
            try:
                schema = json.loads(t.parameters_json_schema)
            except ValueError as exc:
                raise InvalidArgument(f"{field}.parameters_json_schema", f"not valid JSON ({exc})") from None
            if not isinstance(schema, dict):
                raise InvalidArgument(f"{field}.parameters_json_schema", "must be a JSON object")
        tools.append(Tool(t.name, t.description, schema))
    names = {t.name for t in tools}
    if len(names) != len(tools):
        raise InvalidArgument("tools", "tool names must be unique")
    mode = _CHOICES.get(request.tool_choice.mode)
    if mode is None:
        raise InvalidArgument("tool_choice.mode", "unknown mode")
    if mode is ToolChoiceMode.NAMED and request.tool_choice.name not in names:
        raise InvalidArgument("tool_choice.name", "must name one of the request's tools")
    if mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.NAMED) and not tools:
        raise InvalidArgument("tool_choice.mode", "requires tools")
    p = request.params
    if p.HasField("temperature") and p.temperature < 0:
        raise InvalidArgument("params.temperature", "must not be negative")
    if p.HasField("top_p") and not 0 <= p.top_p <= 1:
        raise InvalidArgument("params.top_p", "must be between 0 and 1")
    if p.max_output_tokens < 0:
        raise InvalidArgument("params.max_output_tokens", "must not be negative")
    params = Params(
        temperature=p.temperature if p.HasField("temperature") else None,
        top_p=p.top_p if p.HasField("top_p") else None,
        max_output_tokens=p.max_output_tokens,
        stop=tuple(p.stop),
        seed=p.seed if p.HasField("seed") else None,
    )
    return ChatRequest(tuple(messages), tuple(tools), ToolChoice(mode, request.tool_choice.name), params)


def to_hints(hints: router_pb2.RoutingHints) -> Hints:
    if not 0 <= hints.max_attempts <= MAX_ATTEMPTS_HINT:
        raise InvalidArgument("hints.max_attempts", f"must be from 0 to {MAX_ATTEMPTS_HINT}")
    if hints.max_cost_micros < 0:
        raise InvalidArgument("hints.max_cost_micros", "must not be negative")
    strategy = None
    if hints.strategy != router_pb2.ROUTING_STRATEGY_UNSPECIFIED:
        strategy = _STRATEGIES.get(hints.strategy)
        if strategy is None:
            raise InvalidArgument("hints.strategy", "unknown strategy")
    return Hints(
        strategy=strategy,
        region=hints.region,
        region_required=hints.region_required,
        exclude_providers=frozenset(hints.exclude_providers),
        max_cost_micros=hints.max_cost_micros,
        max_attempts=hints.max_attempts,
    )


# --- response translation -----------------------------------------------------------------------


_HIGH_PRIORITIES = frozenset({common_pb2.PRIORITY_HIGH, common_pb2.PRIORITY_CRITICAL})
_PRIORITIES = frozenset(common_pb2.Priority.values())


def _message_pb(message: Message) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(
        role=common_pb2.ROLE_ASSISTANT,
        content=message.content,
        tool_calls=[
            common_pb2.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments_json)
            for c in message.tool_calls
        ],
    )


def _attempt_pb(a: AttemptRecord) -> router_pb2.Attempt:
    return router_pb2.Attempt(
        provider=a.provider,
        model=a.model,
        outcome=_OUTCOMES[a.outcome],
        http_status=a.http_status,
        latency=_duration(a.latency),
        error=a.error[:300],
    )


def to_response(answer: Answer) -> router_pb2.CompleteResponse:
    result = answer.result
    usage = result.usage
    return router_pb2.CompleteResponse(
        message=_message_pb(result.message),
        finish_reason=_FINISH[result.finish],
        usage=common_pb2.Usage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            total_tokens=usage.total_tokens,
            cache_write_input_tokens=usage.cache_write_input_tokens,
            estimated=usage.estimated,
        ),
        cost=common_pb2.Cost(
            input_cost_micros=answer.cost.input_micros,
            output_cost_micros=answer.cost.output_micros,
            total_cost_micros=answer.cost.total_micros,
        ),
        provider=answer.choice.provider.name,
        model=answer.choice.model.id,
        provider_model=result.provider_model or answer.choice.model.provider_model,
        simulated=answer.choice.provider.simulated or result.simulated,
        attempts=[_attempt_pb(a) for a in answer.attempts],
        latency=_duration(answer.latency),
        response_id=result.response_id,
    )


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(
        self,
        settings: RouterSettings,
        catalog: Catalog,
        gateway: Gateway,
        planner: Planner,
        health: HealthBook,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.gateway = gateway
        self.planner = planner
        self.health = health
        self.clock = clock

    def _call(self, request: router_pb2.CompleteRequest, context: grpc.aio.ServicerContext[Any, Any]) -> Call:
        if request.priority not in _PRIORITIES:
            raise InvalidArgument("priority", f"unknown priority {request.priority}")
        remaining = context.time_remaining()
        budget = (
            self.settings.timeouts.request
            if remaining is None
            else min(remaining, self.settings.timeouts.request)
        )
        return Call(
            model=request.model,
            tier=request.caller.tier,
            region=request.caller.region,
            hints=to_hints(request.hints),
            deadline=self.clock() + budget,
            request_id=request.request_id,
            high_priority=request.priority in _HIGH_PRIORITIES,
        )

    async def Complete(
        self, request: router_pb2.CompleteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.CompleteResponse:
        chat = to_chat_request(request)
        answer = await self.gateway.complete(self._call(request, context), chat)
        return to_response(answer)

    async def StreamComplete(
        self, request: router_pb2.StreamCompleteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[router_pb2.StreamCompleteResponse]:
        inner = request.request
        chat = to_chat_request(inner)
        events = self.gateway.stream(self._call(inner, context), chat)
        grouped = coalesce_text(events, self.settings.stream_flush_interval)
        try:
            async for event in grouped:
                if isinstance(event, Delta):
                    if not event.tool_calls:  # most deltas: text alone
                        yield router_pb2.StreamCompleteResponse(
                            delta=router_pb2.ContentDelta(text=event.text)
                        )
                        continue
                    yield router_pb2.StreamCompleteResponse(
                        delta=router_pb2.ContentDelta(
                            text=event.text,
                            tool_calls=[
                                router_pb2.ToolCallDelta(
                                    index=d.index,
                                    id=d.id,
                                    name=d.name,
                                    arguments_json_fragment=d.arguments_fragment,
                                )
                                for d in event.tool_calls
                            ],
                        )
                    )
                elif isinstance(event, StreamStarted):
                    yield router_pb2.StreamCompleteResponse(
                        start=router_pb2.StreamStart(
                            provider=event.choice.provider.name,
                            model=event.choice.model.id,
                            simulated=event.simulated,
                        )
                    )
                else:
                    yield router_pb2.StreamCompleteResponse(done=to_response(event))
        finally:
            # The grouping first: it reads `events` in a task of its own, which must stop before
            # `events` can be closed.
            await grouped.aclose()
            await events.aclose()  # type: ignore[attr-defined]

    async def Embed(
        self, request: router_pb2.EmbedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.EmbedResponse:
        if not request.inputs:
            raise InvalidArgument("inputs", "at least one input is required")
        if len(request.inputs) > MAX_EMBED_INPUTS:
            raise InvalidArgument("inputs", f"at most {MAX_EMBED_INPUTS} inputs per call")
        for index, text in enumerate(request.inputs):
            if not text:
                raise InvalidArgument(f"inputs[{index}]", "must not be empty")
        remaining = context.time_remaining()
        budget = (
            self.settings.timeouts.request
            if remaining is None
            else min(remaining, self.settings.timeouts.request)
        )
        call = Call(
            model=request.model,
            tier=request.caller.tier,
            region=request.caller.region,
            deadline=self.clock() + budget,
        )
        done = await self.gateway.embed(call, list(request.inputs))
        usage = done.result.usage
        return router_pb2.EmbedResponse(
            embeddings=[router_pb2.Embedding(values=v) for v in done.result.vectors],
            usage=common_pb2.Usage(
                input_tokens=usage.input_tokens, total_tokens=usage.total_tokens, estimated=usage.estimated
            ),
            cost=common_pb2.Cost(
                input_cost_micros=done.cost.input_micros,
                output_cost_micros=done.cost.output_micros,
                total_cost_micros=done.cost.total_micros,
            ),
            provider=done.choice.provider.name,
            model=done.choice.model.id,
        )

    async def ListModels(
        self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.ListModelsResponse:
        catalog = self.catalog
        models = [
            router_pb2.ModelInfo(
                id=m.id,
                provider=m.provider,
                provider_model=m.provider_model,
                context_window=m.context_window,
                input_price_micros_per_mtok=m.input_price_micros_per_mtok,
                output_price_micros_per_mtok=m.output_price_micros_per_mtok,
                region=catalog.providers[m.provider].region,
                simulated=catalog.providers[m.provider].simulated,
                cache_read_price_micros_per_mtok=m.cached_input_price_micros_per_mtok,
                cache_write_price_micros_per_mtok=m.cache_write_price,
                capabilities=router_pb2.ModelCapabilities(
                    params=sorted(m.capabilities.params),
                    unsupported_params=m.capabilities.unsupported_params,
                    tools=m.capabilities.tools,
                    vision=m.capabilities.vision,
                    thinking=m.capabilities.thinking,
                ),
            )
            for m in catalog.enabled_models()
        ]
        aliases = [
            router_pb2.AliasInfo(
                name=name,
                candidates=[c.model for c in self.planner.effective_candidates(name)],
                strategy=_STRATEGY_PB[alias.strategy],
            )
            for name, alias in catalog.aliases.items()
        ]
        return router_pb2.ListModelsResponse(
            models=models, aliases=aliases, tier_defaults=dict(catalog.tier_defaults)
        )

    async def GetProviderStatus(
        self, request: router_pb2.GetProviderStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.GetProviderStatusResponse:
        if request.provider and request.provider not in self.catalog.providers:
            raise InvalidArgument("provider", f"unknown provider {request.provider!r}")
        out = []
        for model in self.catalog.enabled_models():
            if request.provider and model.provider != request.provider:
                continue
            target = (model.provider, model.id)
            health = self.health.get(target)
            removal = self.health.out_of_rotation(model.provider)
            room = health.headroom
            headroom = router_pb2.Headroom(
                remaining_requests=room.remaining_requests,
                remaining_tokens=room.remaining_tokens,
                limit_requests=room.limit_requests,
                limit_tokens=room.limit_tokens,
            )
            if room.reset_requests is not None:
                headroom.reset_requests.CopyFrom(_duration(room.reset_requests))
            if room.reset_tokens is not None:
                headroom.reset_tokens.CopyFrom(_duration(room.reset_tokens))
            if room.observed_at:
                headroom.observed_at.CopyFrom(timestamp(room.observed_at))
            out.append(
                router_pb2.ProviderStatus(
                    provider=model.provider,
                    model=model.id,
                    breaker=_BREAKER[self.health.state(target)],
                    ewma_latency=_duration(health.ewma_latency or 0.0),
                    error_rate=self.health.error_rate(target),
                    headroom=headroom,
                    simulated=self.catalog.providers[model.provider].simulated,
                    requests=health.requests,
                    failures=health.failures,
                    out_of_rotation_reason=removal.reason if removal is not None else "",
                )
            )
        return router_pb2.GetProviderStatusResponse(providers=out)
