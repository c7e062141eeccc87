"""OpenAI chat completions (and any OpenAI-compatible server: vLLM, Ollama, Together, Groq, Azure)."""

from __future__ import annotations

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
    SseEvent,
    endpoint_url,
    make_client,
    merge_deltas,
    parse_json,
    sse_events,
    transport_error,
)
from services.router.providers.errors import check_response, stream_error

FINISH = {
    "stop": Finish.STOP,
    "length": Finish.LENGTH,
    "tool_calls": Finish.TOOL_CALLS,
    "function_call": Finish.TOOL_CALLS,
    "content_filter": Finish.CONTENT_FILTER,
}
# OpenAI has no error flag on tool results; the flag travels as a prefix of the content.
TOOL_ERROR_PREFIX = "[tool error] "


def to_openai_messages(request: ChatRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in request.messages:
        entry: dict[str, Any] = {"role": m.role.value}
        if m.role is Role.TOOL:
            entry["tool_call_id"] = m.tool_call_id
            entry["content"] = (TOOL_ERROR_PREFIX if m.is_error else "") + m.content
        elif m.role is Role.ASSISTANT and m.tool_calls:
            entry["content"] = m.content or None
            entry["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
                for c in m.tool_calls
            ]
        else:
            entry["content"] = m.content
        if m.name:
            entry["name"] = m.name
        out.append(entry)
    return out


def to_openai_body(model: Model, request: ChatRequest, *, stream: bool, provider: Provider) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model.provider_model, "messages": to_openai_messages(request)}
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters or {"type": "object", "properties": {}},
                },
            }
            for t in request.tools
        ]
        mode = request.tool_choice.mode
        if mode is ToolChoiceMode.NAMED:
            body["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice.name}}
        elif mode is not ToolChoiceMode.UNSPECIFIED:
            body["tool_choice"] = mode.value
    params = request.params
    if params.temperature is not None:
        body["temperature"] = params.temperature
    if params.top_p is not None:
        body["top_p"] = params.top_p
    max_tokens = params.max_output_tokens or model.max_output_tokens
    if max_tokens:
        # OpenAI itself wants max_completion_tokens; compatible servers still expect max_tokens.
        body["max_completion_tokens" if provider.kind == "openai" else "max_tokens"] = max_tokens
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if stream:
        body["stream"] = True
        if provider.stream_usage:
            body["stream_options"] = {"include_usage": True}
    return body


def usage_of(data: Any) -> Usage | None:
    if not isinstance(data, dict):
        return None
    details = data.get("prompt_tokens_details") or {}
    return Usage(
        input_tokens=int(data.get("prompt_tokens") or 0),
        output_tokens=int(data.get("completion_tokens") or 0),
        cached_input_tokens=int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0,
    )


def from_openai_body(data: dict[str, Any]) -> ChatResult:
    try:
        choice = data["choices"][0]
        message = choice.get("message") or {}
        calls = tuple(
            ToolCall(
                id=str(c.get("id", "")),
                name=str(c["function"]["name"]),
                arguments_json=str(c["function"].get("arguments") or "{}"),
            )
            for c in message.get("tool_calls") or []
        )
        content = message.get("content") or ""
        if isinstance(content, list):
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        finish = FINISH.get(str(choice.get("finish_reason")), Finish.UNSPECIFIED)
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ProviderError(
            Outcome.PROTOCOL_ERROR, f"unexpected answer shape ({type(exc).__name__})"
        ) from exc
    usage = usage_of(data.get("usage"))
    return ChatResult(
        message=Message(Role.ASSISTANT, str(content), tool_calls=calls),
        finish=finish,
        usage=usage or Usage(),
        provider_model=str(data.get("model", "")),
        response_id=str(data.get("id", "")),
        simulated=bool(data.get("simulated")),
        usage_reported=usage is not None,
    )


class OpenAIAdapter:
    def __init__(self, provider: Provider, options: ClientOptions, sink: HeadersSink) -> None:
        self.provider = provider
        self.options = options
        self._sink = sink
        self._azure = bool(provider.azure_api_version)
        headers = {"content-type": "application/json"}
        if provider.api_key:
            if self._azure:
                headers["api-key"] = provider.api_key
            else:
                headers["authorization"] = f"Bearer {provider.api_key}"
        self._client = make_client(provider, options, headers)
        self._urls: dict[tuple[str, str], httpx.URL] = {}

    def _url(self, model: Model, endpoint: str) -> httpx.URL:
        key = (model.provider_model, endpoint)
        url = self._urls.get(key)
        if url is None:
            if self._azure:
                path = f"/openai/deployments/{model.provider_model}/{endpoint}?api-version={self.provider.azure_api_version}"
            else:
                path = f"/{endpoint}"
            url = self._urls[key] = endpoint_url(self.provider, path)
        return url

    async def aclose(self) -> None:
        await self._client.aclose()

    def _check(self, model: Model, response: httpx.Response, body: bytes | None) -> None:
        check_response(self.provider, model, response, body, self._sink, self.options.max_reset_wait)

    async def _post(self, model: Model, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        content = orjson.dumps(body)
        try:
            response, raw = await self._client.post_for_body(self._url(model, endpoint), content=content)
        except httpx.HTTPError as exc:
            raise transport_error(exc) from exc
        self._check(model, response, raw)
        return parse_json(raw)

    async def complete(self, model: Model, request: ChatRequest) -> ChatResult:
        body = to_openai_body(model, request, stream=False, provider=self.provider)
        return from_openai_body(await self._post(model, "chat/completions", body))

    async def embed(self, model: Model, inputs: list[str]) -> EmbedResult:
        data = await self._post(model, "embeddings", {"model": model.provider_model, "input": inputs})
        try:
            rows = sorted(data["data"], key=lambda row: int(row.get("index", 0)))
            vectors = [[float(v) for v in row["embedding"]] for row in rows]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProviderError(Outcome.PROTOCOL_ERROR, "unexpected embeddings shape") from exc
        if len(vectors) != len(inputs):
            raise ProviderError(Outcome.PROTOCOL_ERROR, f"{len(vectors)} embeddings for {len(inputs)} inputs")
        usage = usage_of(data.get("usage"))
        return EmbedResult(
            vectors,
            usage or Usage(),
            str(data.get("model", "")),
            bool(data.get("simulated")),
            usage_reported=usage is not None,
        )

    async def stream(self, model: Model, request: ChatRequest) -> AsyncIterator[Delta | ChatResult]:
        body = to_openai_body(model, request, stream=True, provider=self.provider)
        content = orjson.dumps(body)
        state = _StreamState()
        done = False
        try:
            async with self._client.stream(self._url(model, "chat/completions"), content=content) as response:
                self._check(model, response, await response.aread() if response.status_code >= 400 else None)
                events = sse_events(response)
                async for first in events:
                    # The events that arrived with this one are relayed with it (merge_deltas);
                    # one that arrives alone, as a paced token does, leaves alone, at once.
                    deltas: list[Delta] = []
                    event: SseEvent | None = first
                    while event is not None:
                        if event.data.strip() == "[DONE]":
                            done = True
                            break
                        chunk = _chunk(event.data)
                        if "error" in chunk:
                            raise stream_error(self.provider, chunk)
                        merge_deltas(deltas, state.apply(chunk))
                        event = events.ready()
                    for delta in deltas:
                        yield delta
                    if done:
                        break
        except httpx.HTTPError as exc:
            raise transport_error(exc) from exc
        if not done:
            raise ProviderError(Outcome.PROTOCOL_ERROR, "the stream ended before [DONE]")
        if state.finish is Finish.UNSPECIFIED:
            raise ProviderError(Outcome.PROTOCOL_ERROR, "the stream ended without a finish reason")
        yield state.result()


def _chunk(text: str) -> dict[str, Any]:
    try:
        chunk = orjson.loads(text)
    except ValueError as exc:
        raise ProviderError(Outcome.PROTOCOL_ERROR, "malformed stream event (not JSON)") from exc
    if not isinstance(chunk, dict):
        raise ProviderError(Outcome.PROTOCOL_ERROR, "malformed stream event")
    return chunk


@dataclass
class _Call:
    """One tool call of a streamed answer as its deltas arrive."""

    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class _StreamState:
    """What a chat-completions stream has said so far; `apply` takes one chunk, returns its deltas."""

    text: list[str] = field(default_factory=list)
    calls: dict[int, _Call] = field(default_factory=dict)
    finish: Finish = Finish.UNSPECIFIED
    # None until a chunk reports usage (the last one does, when stream_options asked for it).
    usage: Usage | None = None
    provider_model: str = ""
    response_id: str = ""
    simulated: bool = False

    def apply(self, chunk: dict[str, Any]) -> list[Delta]:
        self.provider_model = str(chunk.get("model") or self.provider_model)
        self.response_id = str(chunk.get("id") or self.response_id)
        self.simulated = self.simulated or bool(chunk.get("simulated"))
        if chunk.get("usage"):
            self.usage = usage_of(chunk["usage"])
        out = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            piece = delta.get("content") or ""
            calls = tuple(self._call_delta(call) for call in delta.get("tool_calls") or [])
            if choice.get("finish_reason"):
                self.finish = FINISH.get(str(choice["finish_reason"]), Finish.UNSPECIFIED)
            if piece or calls:
                self.text.append(piece)
                out.append(Delta(piece, calls))
        return out

    def _call_delta(self, call: dict[str, Any]) -> ToolCallDelta:
        index = int(call.get("index", 0))
        fn = call.get("function") or {}
        slot = self.calls.setdefault(index, _Call())
        if call.get("id"):
            slot.id = str(call["id"])
        if fn.get("name"):
            slot.name += str(fn["name"])
        fragment = str(fn.get("arguments") or "")
        slot.arguments += fragment
        return ToolCallDelta(index, str(call.get("id") or ""), str(fn.get("name") or ""), fragment)

    def result(self) -> ChatResult:
        # Servers that ignore stream_options send no usage: the gateway estimates it then.
        return ChatResult(
            message=Message(
                Role.ASSISTANT,
                "".join(self.text),
                tool_calls=tuple(
                    ToolCall(c.id, c.name, c.arguments or "{}") for _, c in sorted(self.calls.items())
                ),
            ),
            finish=self.finish,
            usage=self.usage or Usage(),
            provider_model=self.provider_model,
            response_id=self.response_id,
            simulated=self.simulated,
            usage_reported=self.usage is not None,
        )
