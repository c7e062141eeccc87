"""OpenAI's chat-completions, embeddings and models JSON <-> the edge's own messages.

Parsing names the OpenAI parameter in every error; the bodies, stream chunks and error
envelopes are shaped as OpenAI sends them, so the official SDKs (and everything built on
them) read Ballast as they read OpenAI. Pure functions and small classes: no I/O.
"""

from __future__ import annotations

import base64
import math
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import orjson
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2
from ballast.router.v1 import router_pb2
from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from services.kit.errors import BallastError, InvalidArgument, ResourceExhausted

SESSION_HEADER = "x-ballast-session-id"
CACHE_HEADER = "x-ballast-cache"
IDEMPOTENCY_HEADER = "x-ballast-idempotency-key"
CACHE_MODES = {
    "default": edge_pb2.CACHE_MODE_UNSPECIFIED,
    "exact-only": edge_pb2.CACHE_MODE_EXACT_ONLY,
    "bypass": edge_pb2.CACHE_MODE_BYPASS,
    "refresh": edge_pb2.CACHE_MODE_REFRESH,
}

_ROLES = {
    "system": common_pb2.ROLE_SYSTEM,
    "developer": common_pb2.ROLE_SYSTEM,
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
    "tool": common_pb2.ROLE_TOOL,
}
_FINISH: dict[int, str] = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
    common_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
}
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_INT64_MAX = 2**63 - 1
# Known OpenAI parameters Ballast accepts and ignores: they change nothing about the answer.
_IGNORED = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "parallel_tool_calls",
        "prompt_cache_key",
        "safety_identifier",
    }
)
# Known OpenAI parameters Ballast cannot honour yet: refused when set to anything but their default.
_UNSUPPORTED_UNLESS_DEFAULT: dict[str, Any] = {
    "logprobs": False,
    "top_logprobs": None,
    "logit_bias": None,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "audio": None,
    "prediction": None,
    "reasoning_effort": None,
    "verbosity": None,
    "web_search_options": None,
    "functions": None,
    "function_call": None,
}
_HANDLED = frozenset(
    {
        "model",
        "messages",
        "tools",
        "tool_choice",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "seed",
        "response_format",
        "n",
        "stream",
        "stream_options",
        "modalities",
    }
)


class ParamError(InvalidArgument):
    """A bad OpenAI parameter, named as the caller wrote it (`messages[2].content`)."""


@dataclass
class ChatCall:
    """A parsed chat-completions request and what the response must look like."""

    request: edge_pb2.ChatRequest
    stream: bool = False
    include_usage: bool = False
    # origin[i] is the index in the body's `messages` of request.messages[i] (leading system
    # messages become the system prompt, so the two differ).
    origin: list[int] = field(default_factory=list)
    # Which of max_tokens / max_completion_tokens the caller used, to name it in errors.
    max_tokens_param: str = "max_tokens"


# --- parsing --------------------------------------------------------------------------------------


def loads(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ParamError("body", f"is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ParamError("body", "must be a JSON object")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(data: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ParamError(name, "must be a number")
    if not low <= value <= high:
        raise ParamError(name, f"must be between {low:g} and {high:g}")
    return float(value)


def _integer(data: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise ParamError(name, "must be an integer")
    if not low <= value <= high:
        raise ParamError(name, f"must be between {low} and {high}")
    return int(value)


def _text(value: Any, where: str, *, nullable: bool) -> str:
    """A message's content: a string, or an array of text parts (other kinds are not supported)."""
    if value is None:
        if nullable:
            return ""
        raise ParamError(where, "is required")
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ParamError(where, "must be a string or an array of content parts")
    pieces = []
    for index, part in enumerate(value):
        if not isinstance(part, dict):
            raise ParamError(f"{where}[{index}]", "must be an object")
        kind = part.get("type")
        if kind != "text":
            raise ParamError(
                f"{where}[{index}].type", f"content part type {kind!r} is not supported yet; only 'text' is"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ParamError(f"{where}[{index}].text", "must be a string")
        pieces.append(text)
    return "".join(pieces)


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ParamError(where, "must be a string")
    return value


def _tool_calls(value: Any, where: str) -> list[common_pb2.ToolCall]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ParamError(where, "must be an array")
    calls = []
    for index, raw in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(raw, dict):
            raise ParamError(at, "must be an object")
        if raw.get("type", "function") != "function":
            raise ParamError(f"{at}.type", "only 'function' tool calls are supported")
        function = raw.get("function")
        if not isinstance(function, dict):
            raise ParamError(f"{at}.function", "must be an object")
        calls.append(
            common_pb2.ToolCall(
                id=_string(raw.get("id"), f"{at}.id"),
                name=_string(function.get("name"), f"{at}.function.name"),
                arguments_json=_string(function.get("arguments", "{}"), f"{at}.function.arguments"),
            )
        )
    return calls


def _message(raw: Any, where: str) -> common_pb2.ChatMessage:
    if not isinstance(raw, dict):
        raise ParamError(where, "must be an object")
    role_name = raw.get("role")
    role = _ROLES.get(role_name) if isinstance(role_name, str) else None
    if role is None:
        raise ParamError(f"{where}.role", "must be one of system, developer, user, assistant, tool")
    message = common_pb2.ChatMessage(role=role)
    message.content = _text(
        raw.get("content"), f"{where}.content", nullable=role == common_pb2.ROLE_ASSISTANT
    )
    name = raw.get("name")
    if name is not None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ParamError(f"{where}.name", "must match [A-Za-z0-9_-]{1,64}")
        message.name = name
    if role == common_pb2.ROLE_ASSISTANT:
        message.tool_calls.extend(_tool_calls(raw.get("tool_calls"), f"{where}.tool_calls"))
    elif "tool_calls" in raw:
        raise ParamError(f"{where}.tool_calls", "only assistant messages carry tool calls")
    if role == common_pb2.ROLE_TOOL:
        message.tool_call_id = _string(raw.get("tool_call_id"), f"{where}.tool_call_id")
    return message


def _tools(value: Any) -> list[common_pb2.ToolDefinition]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ParamError("tools", "must be an array")
    tools = []
    for index, raw in enumerate(value):
        at = f"tools[{index}]"
        if not isinstance(raw, dict):
            raise ParamError(at, "must be an object")
        if raw.get("type") != "function":
            raise ParamError(f"{at}.type", "only 'function' tools are supported")
        function = raw.get("function")
        if not isinstance(function, dict):
            raise ParamError(f"{at}.function", "must be an object")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise ParamError(f"{at}.function.description", "must be a string")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ParamError(f"{at}.function.parameters", "must be a JSON Schema object")
        tools.append(
            common_pb2.ToolDefinition(
                name=_string(function.get("name"), f"{at}.function.name"),
                description=description,
                parameters_json_schema=orjson.dumps(parameters).decode() if parameters is not None else "",
            )
        )
    return tools


def _tool_choice(value: Any) -> common_pb2.ToolChoice:
    if value is None:
        return common_pb2.ToolChoice()
    modes = {
        "auto": common_pb2.TOOL_CHOICE_MODE_AUTO,
        "none": common_pb2.TOOL_CHOICE_MODE_NONE,
        "required": common_pb2.TOOL_CHOICE_MODE_REQUIRED,
    }
    if isinstance(value, str):
        if value not in modes:
            raise ParamError("tool_choice", "must be 'auto', 'none', 'required' or a named function")
        return common_pb2.ToolChoice(mode=modes[value])
    if (
        isinstance(value, dict)
        and value.get("type") == "function"
        and isinstance(value.get("function"), dict)
    ):
        name = value["function"].get("name")
        return common_pb2.ToolChoice(
            mode=common_pb2.TOOL_CHOICE_MODE_NAMED, name=_string(name, "tool_choice.function.name")
        )
    raise ParamError("tool_choice", "must be 'auto', 'none', 'required' or a named function")


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ParamError("stop", "must be a non-empty string or an array of non-empty strings")
    if len(stops) > 4:
        raise ParamError("stop", "at most 4 stop sequences")
    return list(stops)


def _check_unsupported(data: Mapping[str, Any]) -> None:
    for name in data:
        if name in _HANDLED or name in _IGNORED:
            continue
        if name not in _UNSUPPORTED_UNLESS_DEFAULT:
            raise ParamError(name, "unrecognized request argument")
        value, default = data[name], _UNSUPPORTED_UNLESS_DEFAULT[name]
        if value is not None and value != default and value != {} and value != []:
            raise ParamError(name, "is not supported by Ballast yet")
    n = data.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise ParamError("n", "only n=1 is supported")
    modalities = data.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise ParamError("modalities", "only ['text'] is supported")
    response_format = data.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind != "text":
            raise ParamError(
                "response_format",
                "only {'type': 'text'} is supported yet (json_object and json_schema are not)",
            )


def parse_chat(data: Mapping[str, Any], headers: Mapping[str, str]) -> ChatCall:
    """A chat-completions body (already decoded) and the request's headers -> the edge's ChatRequest."""
    _check_unsupported(data)
    request = edge_pb2.ChatRequest()
    model = data.get("model", "")
    request.model = _string(model if model is not None else "", "model")
    raw_messages = data.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise ParamError("messages", "must be a non-empty array")
    messages = [_message(raw, f"messages[{index}]") for index, raw in enumerate(raw_messages)]
    # Leading system (and developer) messages are the system prompt: sent to the model on every
    # turn but never appended to a session, so a client that resends them each turn is not
    # recorded saying them again.
    lead = 0
    while lead < len(messages) - 1 and messages[lead].role == common_pb2.ROLE_SYSTEM:
        lead += 1
    request.system_prompt = "\n\n".join(m.content for m in messages[:lead])
    request.messages.extend(messages[lead:])
    origin = list(range(lead, len(messages)))
    request.tools.extend(_tools(data.get("tools")))
    request.tool_choice.CopyFrom(_tool_choice(data.get("tool_choice")))
    params = request.params
    temperature = _number(data, "temperature", 0.0, 2.0)
    if temperature is not None:
        params.temperature = temperature
    top_p = _number(data, "top_p", 0.0, 1.0)
    if top_p is not None:
        params.top_p = top_p
    max_tokens_param = (
        "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = _integer(data, max_tokens_param, 1, _INT64_MAX)
    if max_tokens is not None:
        params.max_output_tokens = max_tokens
    params.stop.extend(_stop(data.get("stop")))
    seed = _integer(data, "seed", -(2**63), _INT64_MAX)
    if seed is not None:
        params.seed = seed
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ParamError("stream", "must be a boolean")
    options = data.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise ParamError("stream_options", "must be an object")
        if not stream:
            raise ParamError("stream_options", "is only allowed when stream is true")
        flag = options.get("include_usage", False)
        if not isinstance(flag, bool):
            raise ParamError("stream_options.include_usage", "must be a boolean")
        include_usage = flag
    _apply_headers(request, headers)
    return ChatCall(
        request=request,
        stream=bool(stream),
        include_usage=include_usage,
        origin=origin,
        max_tokens_param=max_tokens_param,
    )


def _apply_headers(request: edge_pb2.ChatRequest, headers: Mapping[str, str]) -> None:
    # The values are checked where the gRPC fields are (validate_chat); errors name the header.
    request.session_id = headers.get(SESSION_HEADER, "")
    request.idempotency_key = headers.get(IDEMPOTENCY_HEADER, "")
    mode = headers.get(CACHE_HEADER)
    if mode is not None:
        if mode not in CACHE_MODES:
            raise ParamError(CACHE_HEADER, "must be one of " + ", ".join(CACHE_MODES))
        request.cache_mode = CACHE_MODES[mode]


_FIELD_PARAMS = {
    "params.temperature": "temperature",
    "params.top_p": "top_p",
    "params.stop": "stop",
    "params.seed": "seed",
    "tool_choice.name": "tool_choice",
    "session_id": SESSION_HEADER,
    "idempotency_key": IDEMPOTENCY_HEADER,
    "cache_mode": CACHE_HEADER,
}
_MESSAGE_FIELD = re.compile(r"^messages\[(\d+)\](.*)$")
_TOOL_FIELD = re.compile(r"^tools\[(\d+)\]\.(name|parameters_json_schema)$")
_CALL_FIELD = re.compile(r"^(\.tool_calls\[\d+\])\.(name|arguments_json)$")


def openai_param(field: str, call: ChatCall | None) -> str:
    """The OpenAI parameter for a field of the edge's ChatRequest named in a validation error."""
    if field in _FIELD_PARAMS:
        return _FIELD_PARAMS[field]
    if field == "params.max_output_tokens":
        return call.max_tokens_param if call is not None else "max_tokens"
    match = _MESSAGE_FIELD.match(field)
    if match is not None:
        index = int(match.group(1))
        if call is not None and index < len(call.origin):
            index = call.origin[index]
        rest = match.group(2)
        in_call = _CALL_FIELD.match(rest)
        if in_call is not None:
            part = "name" if in_call.group(2) == "name" else "arguments"
            rest = f"{in_call.group(1)}.function.{part}"
        return f"messages[{index}]{rest}"
    match = _TOOL_FIELD.match(field)
    if match is not None:
        part = "name" if match.group(2) == "name" else "parameters"
        return f"tools[{match.group(1)}].function.{part}"
    if field.startswith("inputs"):
        return "input" + field.removeprefix("inputs")
    return field


# --- responses ------------------------------------------------------------------------------------


def finish_reason(reason: int) -> str:
    return _FINISH.get(reason, "stop")


def usage_json(usage: common_pb2.Usage) -> dict[str, Any]:
    total = usage.total_tokens or usage.input_tokens + usage.output_tokens
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": total,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
    }


def _tool_calls_json(calls: Iterable[common_pb2.ToolCall]) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
        for c in calls
    ]


def completion_id(request_id: str) -> str:
    return "chatcmpl-" + request_id


def completion(response: edge_pb2.ChatResponse, created: int) -> bytes:
    """A `chat.completion` object for a finished turn."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": response.message.content or (None if response.message.tool_calls else ""),
        "refusal": None,
    }
    if response.message.tool_calls:
        message["tool_calls"] = _tool_calls_json(response.message.tool_calls)
    return orjson.dumps(
        {
            "id": completion_id(response.request_id),
            "object": "chat.completion",
            "created": created,
            "model": response.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": finish_reason(response.finish_reason),
                }
            ],
            "usage": usage_json(response.usage),
            "system_fingerprint": None,
        }
    )


class ChunkWriter:
    """`chat.completion.chunk` SSE events for one streamed turn, framed as OpenAI frames them."""

    def __init__(self, request_id: str, model: str, created: int, *, include_usage: bool) -> None:
        self._base: dict[str, Any] = {
            "id": completion_id(request_id),
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }
        self._include_usage = include_usage
        # Tool calls whose first delta (with id, type and name) was sent, by index.
        self.started_calls: set[int] = set()

    def _event(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {
            **self._base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self._include_usage:
            chunk["usage"] = None
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def role(self) -> bytes:
        return self._event({"role": "assistant", "content": "", "refusal": None})

    def text(self, text: str) -> bytes:
        return self._event({"content": text})

    def tool_calls(self, deltas: Sequence[router_pb2.ToolCallDelta]) -> bytes:
        out = []
        for d in deltas:
            if d.id or d.index not in self.started_calls:
                self.started_calls.add(d.index)
                out.append(
                    {
                        "index": d.index,
                        "id": d.id,
                        "type": "function",
                        "function": {"name": d.name, "arguments": d.arguments_json_fragment},
                    }
                )
            else:
                out.append({"index": d.index, "function": {"arguments": d.arguments_json_fragment}})
        return self._event({"tool_calls": out})

    def finish(self, reason: int) -> bytes:
        return self._event({}, finish_reason(reason))

    def usage(self, usage: common_pb2.Usage) -> bytes:
        return b"data: " + orjson.dumps({**self._base, "choices": [], "usage": usage_json(usage)}) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def error_event(body: bytes) -> bytes:
    """An SSE error event: the SDKs raise it as an APIError instead of ending the stream cleanly."""
    return b"event: error\ndata: " + body + b"\n\n"


def models_json(listing: router_pb2.ListModelsResponse) -> bytes:
    data = [{"id": m.id, "object": "model", "created": 0, "owned_by": m.provider} for m in listing.models]
    data += [{"id": a.name, "object": "model", "created": 0, "owned_by": "ballast"} for a in listing.aliases]
    return orjson.dumps({"object": "list", "data": data})


def model_json(listing: router_pb2.ListModelsResponse, model_id: str) -> bytes | None:
    for m in listing.models:
        if m.id == model_id:
            return orjson.dumps({"id": m.id, "object": "model", "created": 0, "owned_by": m.provider})
    for a in listing.aliases:
        if a.name == model_id:
            return orjson.dumps({"id": a.name, "object": "model", "created": 0, "owned_by": "ballast"})
    return None


@dataclass
class EmbedCall:
    request: router_pb2.EmbedRequest
    base64: bool = False


def parse_embeddings(data: Mapping[str, Any]) -> EmbedCall:
    """An embeddings body -> the router's EmbedRequest (the router bounds the number of inputs)."""
    for name in data:
        if name not in ("model", "input", "encoding_format", "user", "dimensions"):
            raise ParamError(name, "unrecognized request argument")
    if data.get("dimensions") is not None:
        raise ParamError("dimensions", "is not supported by Ballast yet")
    raw = data.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs:
        raise ParamError("input", "must be a non-empty string or array of strings")
    for index, text in enumerate(inputs):
        if not isinstance(text, str):
            raise ParamError(f"input[{index}]", "must be a string (token arrays are not supported)")
        if not text:
            raise ParamError(f"input[{index}]", "must not be empty")
    encoding = data.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise ParamError("encoding_format", "must be 'float' or 'base64'")
    model = data.get("model")
    request = router_pb2.EmbedRequest(model=_string(model, "model"), inputs=inputs)
    return EmbedCall(request=request, base64=encoding == "base64")


def embeddings_json(response: router_pb2.EmbedResponse, *, as_base64: bool) -> bytes:
    def vector(values: Sequence[float]) -> Any:
        if not as_base64:
            return list(values)
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()

    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": vector(e.values)}
                for i, e in enumerate(response.embeddings)
            ],
            "model": response.model,
            "usage": {
                "prompt_tokens": response.usage.input_tokens,
                "total_tokens": response.usage.total_tokens or response.usage.input_tokens,
            },
        }
    )


# --- errors ---------------------------------------------------------------------------------------


@dataclass
class HttpError:
    """An error as an HTTP status, headers and OpenAI's `{"error": {...}}` body."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", "failed_precondition"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", "out_of_range"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", "permission_denied"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", "conflict"),
    grpc.StatusCode.ABORTED: (409, "invalid_request_error", "conflict"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "requests", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", "deadline_exceeded"),
    grpc.StatusCode.CANCELLED: (499, "invalid_request_error", "cancelled"),
}


def _details(error: BallastError) -> list[Any]:
    out = []
    for detail in error.details():
        if isinstance(detail, any_pb2.Any):
            for kind in (
                error_details_pb2.BadRequest,
                error_details_pb2.RetryInfo,
                error_details_pb2.ErrorInfo,
            ):
                if detail.Is(kind.DESCRIPTOR):
                    message = kind()
                    detail.Unpack(message)
                    out.append(message)
        else:
            out.append(detail)
    return out


def envelope(message: str, kind: str, param: str | None, code: str | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format: 20ms, 1s, 6m0s, 1h2m3s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def ratelimit_headers(trailing: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-{limit,remaining,reset}-{requests,tokens} from the edge's x-ratelimit-* pairs."""
    values = dict(trailing)
    if "x-ratelimit-limit" not in values:
        return []
    kind = "tokens" if "token" in values.get("x-ratelimit-policy", "") else "requests"
    try:
        reset = openai_duration(float(values.get("x-ratelimit-reset", "0")))
    except ValueError:
        reset = "0ms"
    headers = [(name.encode(), value.encode()) for name, value in values.items()]
    headers += [
        (f"x-ratelimit-limit-{kind}".encode(), values["x-ratelimit-limit"].encode()),
        (f"x-ratelimit-remaining-{kind}".encode(), values.get("x-ratelimit-remaining", "0").encode()),
        (f"x-ratelimit-reset-{kind}".encode(), reset.encode()),
    ]
    return headers


def quota_headers(quotas: Iterable[common_pb2.Quota]) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-* headers for a success: the tightest request and token quota."""
    tightest: dict[str, common_pb2.Quota] = {}
    for quota in quotas:
        if quota.unlimited or quota.limit <= 0:
            continue
        kind = "tokens" if "token" in quota.name else "requests"
        best = tightest.get(kind)
        if best is None or quota.remaining / quota.limit < best.remaining / best.limit:
            tightest[kind] = quota
    headers = []
    for kind, quota in tightest.items():
        reset = quota.reset_after.seconds + quota.reset_after.nanos / 1e9
        headers += [
            (f"x-ratelimit-limit-{kind}".encode(), str(quota.limit).encode()),
            (f"x-ratelimit-remaining-{kind}".encode(), str(max(0, quota.remaining)).encode()),
            (f"x-ratelimit-reset-{kind}".encode(), openai_duration(reset).encode()),
        ]
    return headers


def http_error(exc: BallastError, call: ChatCall | None = None, *, max_retry_wait: float = 60.0) -> HttpError:
    """The HTTP answer for a domain error: status per gRPC code, OpenAI's envelope, retry headers."""
    status, kind, code = _STATUS.get(exc.code, (500, "server_error", "internal_error"))
    details = _details(exc)
    param: str | None = None
    message = exc.message
    headers: list[tuple[bytes, bytes]] = []
    if isinstance(exc, InvalidArgument):
        param = exc.field if isinstance(exc, ParamError) else openai_param(exc.field, call)
        message = f"{param}: {exc.description}"
    else:
        for detail in details:
            if isinstance(detail, error_details_pb2.BadRequest) and detail.field_violations:
                violation = detail.field_violations[0]
                param = openai_param(violation.field, call)
                message = f"{param}: {violation.description}"
    if param == "model" and "unknown model" in message:
        # The router names an unknown model as a bad argument; OpenAI answers 404 model_not_found.
        status, code = 404, "model_not_found"
    if status == 429:
        retry_after: float | None = exc.retry_after if isinstance(exc, ResourceExhausted) else None
        reason = exc.reason if isinstance(exc, ResourceExhausted) else ""
        for detail in details:
            if isinstance(detail, error_details_pb2.RetryInfo) and retry_after is None:
                retry_after = detail.retry_delay.ToTimedelta().total_seconds()
            if isinstance(detail, error_details_pb2.ErrorInfo) and not reason:
                reason = detail.reason
        if "tokens" in reason:
            # A spent token budget: OpenAI's `insufficient_quota`. Its retry-after (the budget's reset)
            # is usually beyond what the SDKs wait for, so they give up instead of hammering.
            kind, code = "insufficient_quota", "insufficient_quota"
        elif reason:
            kind = "tokens" if "token" in reason else "requests"
        if retry_after is not None and retry_after >= 0:
            headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
            headers.append((b"retry-after-ms", str(round(retry_after * 1000)).encode()))
            if retry_after > max_retry_wait:
                headers.append((b"x-should-retry", b"false"))
        headers += ratelimit_headers(exc.trailing)
    return HttpError(status, envelope(message, kind, param, code), headers)


def internal_error(trace_id: str) -> HttpError:
    return HttpError(
        500, envelope(f"internal error (trace id {trace_id})", "server_error", None, "internal_error")
    )
