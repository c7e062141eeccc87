"""Anthropic messages API: system prompt split out, tool_use/tool_result blocks, stop reasons."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

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
        return json.dumps(body, separators=(",", ":")).encode()

    async def complete(self, model: Model, request: ChatRequest) -> ChatResult:
        try:
            response = await self._client.post(self._url, content=self._body(model, request, False))
            raw = response.content
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
        blocks: dict[int, list[str]] = {}  # index -> [type, id, name, text/json]
        tool_order: dict[int, int] = {}  # block index -> tool call index
        usage = Usage()
        finish = Finish.UNSPECIFIED
        provider_model = response_id = ""
        simulated = stopped = False
        try:
            async with self._client.stream(self._url, content=self._body(model, request, True)) as response:
                self._check(model, response, await response.aread() if response.status_code >= 400 else None)
                async for event in sse_events(response):
                    try:
                        data = json.loads(event.data)
                    except ValueError as exc:
                        raise ProviderError(
                            Outcome.PROTOCOL_ERROR, "malformed stream event (not JSON)"
                        ) from exc
                    if not isinstance(data, dict):
                        raise ProviderError(Outcome.PROTOCOL_ERROR, "malformed stream event")
                    kind = data.get("type", event.event)
                    if kind == "message_start":
                        message = data.get("message") or {}
                        provider_model = str(message.get("model", ""))
                        response_id = str(message.get("id", ""))
                        simulated = bool(message.get("simulated"))
                        usage = usage_of(message.get("usage"))
                    elif kind == "content_block_start":
                        index = int(data.get("index", 0))
                        block = data.get("content_block") or {}
                        blocks[index] = [
                            str(block.get("type")),
                            str(block.get("id", "")),
                            str(block.get("name", "")),
                            "",
                        ]
                        if block.get("type") == "tool_use":
                            tool_order[index] = len(tool_order)
                            yield Delta(
                                "",
                                (ToolCallDelta(tool_order[index], blocks[index][1], blocks[index][2], ""),),
                            )
                    elif kind == "content_block_delta":
                        index = int(data.get("index", 0))
                        delta = data.get("delta") or {}
                        slot = blocks.setdefault(index, ["text", "", "", ""])
                        if delta.get("type") == "text_delta":
                            piece = str(delta.get("text", ""))
                            slot[3] += piece
                            if piece:
                                yield Delta(piece)
                        elif delta.get("type") == "input_json_delta" and index in tool_order:
                            fragment = str(delta.get("partial_json", ""))
                            slot[3] += fragment
                            if fragment:
                                yield Delta(
                                    "", (ToolCallDelta(tool_order[index], arguments_fragment=fragment),)
                                )
                    elif kind == "message_delta":
                        reason = (data.get("delta") or {}).get("stop_reason")
                        if reason:
                            finish = STOP.get(str(reason), Finish.UNSPECIFIED)
                        delta_usage = data.get("usage") or {}
                        if "output_tokens" in delta_usage:
                            usage.output_tokens = int(delta_usage["output_tokens"] or 0)
                        if delta_usage.get("input_tokens") is not None:
                            usage = Usage(
                                usage_of(delta_usage).input_tokens or usage.input_tokens,
                                usage.output_tokens,
                                usage.cached_input_tokens,
                            )
                    elif kind == "message_stop":
                        stopped = True
                        break
                    elif kind == "error":
                        raise stream_error(self.provider, data)
        except httpx.HTTPError as exc:
            raise transport_error(exc) from exc
        if not stopped:
            raise ProviderError(Outcome.PROTOCOL_ERROR, "the stream ended before message_stop")
        text = "".join(b[3] for _, b in sorted(blocks.items()) if b[0] == "text")
        calls = tuple(
            ToolCall(blocks[i][1], blocks[i][2], blocks[i][3] or "{}")
            for i in sorted(tool_order, key=tool_order.get)  # type: ignore[arg-type]
        )
        yield ChatResult(
            message=Message(Role.ASSISTANT, text, tool_calls=calls),
            finish=finish,
            usage=usage,
            provider_model=provider_model,
            response_id=response_id,
            simulated=simulated,
        )
