"""Anthropic messages API: system prompt split out, tool_use/tool_result blocks, stop reasons."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from services.router.catalog import Model, Provider
from services.router.model import (
    ChatRequest,
    ChatResult,
    Delta,
    EmbedResult,
    Finish,
    Message,
    Role,
    ToolCall,
    ToolCallDelta,
    ToolChoiceMode,
    Usage,
)
from services.router.providers.base import (
    ClientOptions,
    HeadersSink,
    Outcome,
    ProviderError,
    endpoint_url,
    make_client,
    parse_json,
    sse_events,
    transport_error,
)
from services.router.providers.errors import check_response, stream_error

API_VERSION = "2023-06-01"
STOP = {
    "end_turn": Finish.STOP,
    "stop_sequence": Finish.STOP,
    "pause_turn": Finish.STOP,
    "max_tokens": Finish.LENGTH,
    "model_context_window_exceeded": Finish.LENGTH,
    "tool_use": Finish.TOOL_CALLS,
    "refusal": Finish.CONTENT_FILTER,
}


def _arguments(text: str) -> Any:
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        # Anthropic wants an object; keep malformed arguments rather than dropping them.
        return {"_raw_arguments": text}


def to_anthropic_body(
    model: Model, request: ChatRequest, *, stream: bool, default_max_tokens: int
) -> dict[str, Any]:
    system = [m.content for m in request.messages if m.role is Role.SYSTEM]
    messages: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        # Tool results and the user's next words travel in one user turn, as Anthropic expects.
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})

    for m in request.messages:
        if m.role is Role.SYSTEM:
            continue
        if m.role is Role.TOOL:
            block: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": m.tool_call_id,
                "content": m.content,
            }
            if m.is_error:
                block["is_error"] = True
            add("user", [block])
        elif m.role is Role.ASSISTANT:
            blocks: list[dict[str, Any]] = [{"type": "text", "text": m.content}] if m.content else []
            blocks += [
                {"type": "tool_use", "id": c.id, "name": c.name, "input": _arguments(c.arguments_json)}
                for c in m.tool_calls
            ]
            if blocks:  # Anthropic rejects empty text blocks; an empty turn carries nothing anyway
                add("assistant", blocks)
        else:
            add("user", [{"type": "text", "text": m.content}])
    params = request.params
    body: dict[str, Any] = {
        "model": model.provider_model,
        "max_tokens": params.max_output_tokens or model.max_output_tokens or default_max_tokens,
        "messages": messages,
    }
    if system:
        body["system"] = "\n\n".join(system)
    if request.tools:
        body["tools"] = [
            {
                "name": t.name,
                "description": t.description,
                "input_schema": t.parameters or {"type": "object", "properties": {}},
            }
            for t in request.tools
        ]
        mode = request.tool_choice.mode
        if mode is ToolChoiceMode.NAMED:
            body["tool_choice"] = {"type": "tool", "name": request.tool_choice.name}
        elif mode is ToolChoiceMode.REQUIRED:
            body["tool_choice"] = {"type": "any"}
        elif mode is ToolChoiceMode.NONE:
            body["tool_choice"] = {"type": "none"}
        elif mode is ToolChoiceMode.AUTO:
            body["tool_choice"] = {"type": "auto"}
    if params.temperature is not None:
        body["temperature"] = params.temperature
    if params.top_p is not None:
        body["top_p"] = params.top_p
    if params.stop:
        body["stop_sequences"] = list(params.stop)
    if stream:
        body["stream"] = True
    return body


def usage_of(data: Any) -> Usage:
    if not isinstance(data, dict):
        return Usage()
    cached = int(data.get("cache_read_input_tokens") or 0)
    created = int(data.get("cache_creation_input_tokens") or 0)
    # Anthropic's input_tokens excludes cache reads and writes; Ballast's input_tokens includes them.
    return Usage(
        input_tokens=int(data.get("input_tokens") or 0) + cached + created,
        output_tokens=int(data.get("output_tokens") or 0),
        cached_input_tokens=cached,
        cache_write_input_tokens=created,
    )


def from_anthropic_body(data: dict[str, Any]) -> ChatResult:
    text: list[str] = []
    calls: list[ToolCall] = []
    try:
        for block in data["content"]:
            if block.get("type") == "text":
                text.append(str(block.get("text", "")))
            elif block.get("type") == "tool_use":
                calls.append(
                    ToolCall(str(block["id"]), str(block["name"]), json.dumps(block.get("input") or {}))
                )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ProviderError(
            Outcome.PROTOCOL_ERROR, f"unexpected answer shape ({type(exc).__name__})"
        ) from exc
    return ChatResult(
        message=Message(Role.ASSISTANT, "".join(text), tool_calls=tuple(calls)),
        finish=STOP.get(str(data.get("stop_reason")), Finish.UNSPECIFIED),
        usage=usage_of(data.get("usage")),
        provider_model=str(data.get("model", "")),
        response_id=str(data.get("id", "")),
        simulated=bool(data.get("simulated")),
        usage_reported=isinstance(data.get("usage"), dict),
    )


class AnthropicAdapter:
    def __init__(self, provider: Provider, options: ClientOptions, sink: HeadersSink) -> None:
        self.provider = provider
        self.options = options
        self._sink = sink
        headers = {"content-type": "application/json", "anthropic-version": API_VERSION}
        if provider.api_key:
            headers["x-api-key"] = provider.api_key
        self._client = make_client(provider, options, headers)
        self._url = endpoint_url(
            provider, "/messages" if provider.base_url.rstrip("/").endswith("/v1") else "/v1/messages"
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _check(self, model: Model, response: httpx.Response, body: bytes | None) -> None:
        check_response(self.provider, model, response, body, self._sink, self.options.max_reset_wait)

    def _body(self, model: Model, request: ChatRequest, stream: bool) -> bytes:
        body = to_anthropic_body(
            model, request, stream=stream, default_max_tokens=self.options.default_max_output_tokens
        )
        return orjson.dumps(body)

    async def complete(self, model: Model, request: ChatRequest) -> ChatResult:
        try:
            response, raw = await self._client.post_for_body(
                self._url, content=self._body(model, request, False)
            )
        except httpx.HTTPError as exc:
            raise transport_error(exc) from exc
        self._check(model, response, raw)
        return from_anthropic_body(parse_json(raw))

    async def embed(self, model: Model, inputs: list[str]) -> EmbedResult:
        raise ProviderError(
            Outcome.CLIENT_ERROR,
            f"provider {self.provider.name} (Anthropic) offers no embeddings",
            http_status=0,
        )

    async def stream(self, model: Model, request: ChatRequest) -> AsyncIterator[Delta | ChatResult]:
        state = _StreamState()
        try:
            async with self._client.stream(self._url, content=self._body(model, request, True)) as response:
                self._check(model, response, await response.aread() if response.status_code >= 400 else None)
                async for event in sse_events(response):
                    data = _event_data(event.data)
                    kind = data.get("type", event.event)
                    if kind == "message_stop":
                        state.stopped = True
                        break
                    if kind == "error":
                        raise stream_error(self.provider, data)
                    delta = state.apply(kind, data)
                    if delta is not None:
                        yield delta
        except httpx.HTTPError as exc:
            raise transport_error(exc) from exc
        if not state.stopped:
            raise ProviderError(Outcome.PROTOCOL_ERROR, "the stream ended before message_stop")
        yield state.result()


def _event_data(text: str) -> dict[str, Any]:
    try:
        data = orjson.loads(text)
    except ValueError as exc:
        raise ProviderError(Outcome.PROTOCOL_ERROR, "malformed stream event (not JSON)") from exc
    if not isinstance(data, dict):
        raise ProviderError(Outcome.PROTOCOL_ERROR, "malformed stream event")
    return data


@dataclass
class _Block:
    """One content block of a streamed message as it grows."""

    type: str
    id: str = ""
    name: str = ""
    # Text for text blocks, the arguments' JSON for tool_use blocks.
    content: str = ""
    # The block's place among the message's tool calls (tool_use blocks only).
    tool_index: int = -1


@dataclass
class _StreamState:
    """What a message stream has said so far; `apply` takes one event and returns its delta."""

    blocks: dict[int, _Block] = field(default_factory=dict)
    tool_calls: int = 0
    # The usage object as last reported: message_start's, overwritten field by field by
    # message_delta's, which carries the final counts (output and, since 2025, input and cache).
    usage: dict[str, Any] = field(default_factory=dict)
    usage_reported: bool = False
    finish: Finish = Finish.UNSPECIFIED
    provider_model: str = ""
    response_id: str = ""
    simulated: bool = False
    stopped: bool = False

    def apply(self, kind: str, data: dict[str, Any]) -> Delta | None:
        if kind == "message_start":
            self._start(data.get("message") or {})
        elif kind == "content_block_start":
            return self._block_start(int(data.get("index", 0)), data.get("content_block") or {})
        elif kind == "content_block_delta":
            return self._block_delta(int(data.get("index", 0)), data.get("delta") or {})
        elif kind == "message_delta":
            reason = (data.get("delta") or {}).get("stop_reason")
            if reason:
                self.finish = STOP.get(str(reason), Finish.UNSPECIFIED)
            self._usage(data.get("usage"))
        return None

    def _start(self, message: dict[str, Any]) -> None:
        self.provider_model = str(message.get("model", ""))
        self.response_id = str(message.get("id", ""))
        self.simulated = bool(message.get("simulated"))
        self._usage(message.get("usage"))

    def _usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.usage.update({k: v for k, v in usage.items() if v is not None})
            self.usage_reported = True

    def _block_start(self, index: int, block: dict[str, Any]) -> Delta | None:
        entry = self.blocks[index] = _Block(
            str(block.get("type")), str(block.get("id", "")), str(block.get("name", ""))
        )
        if entry.type != "tool_use":
            return None
        entry.tool_index = self.tool_calls
        self.tool_calls += 1
        return Delta("", (ToolCallDelta(entry.tool_index, entry.id, entry.name, ""),))

    def _block_delta(self, index: int, delta: dict[str, Any]) -> Delta | None:
        entry = self.blocks.setdefault(index, _Block("text"))
        if delta.get("type") == "text_delta":
            piece = str(delta.get("text", ""))
            entry.content += piece
            return Delta(piece) if piece else None
        if delta.get("type") == "input_json_delta" and entry.tool_index >= 0:
            fragment = str(delta.get("partial_json", ""))
            entry.content += fragment
            if fragment:
                return Delta("", (ToolCallDelta(entry.tool_index, arguments_fragment=fragment),))
        # thinking_delta and signature_delta: the reasoning is not part of the answer.
        return None

    def result(self) -> ChatResult:
        ordered = [block for _, block in sorted(self.blocks.items())]
        tools = sorted((b for b in ordered if b.tool_index >= 0), key=lambda b: b.tool_index)
        return ChatResult(
            message=Message(
                Role.ASSISTANT,
                "".join(b.content for b in ordered if b.type == "text"),
                tool_calls=tuple(ToolCall(b.id, b.name, b.content or "{}") for b in tools),
            ),
            finish=self.finish,
            usage=usage_of(self.usage),
            provider_model=self.provider_model,
            response_id=self.response_id,
            simulated=self.simulated,
            usage_reported=self.usage_reported,
        )
