"""The wire formats the SIMULATED provider speaks: requests parsed from OpenAI chat completions and
Anthropic messages, answers and SSE stream frames built in each format, embeddings, and the
duration texts of rate-limit headers. No I/O: server.py reads and writes the bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        # OpenAI names the offending request field in `param`.
        self.param = param


@dataclass
class Chat:
    """A chat request, whatever the wire format."""

    wire: str
    model: str
    messages: list[tuple[str, str]]  # (role, text); role "tool" marks a tool result
    tools: list[tuple[str, dict[str, Any]]]
    tool_choice: str  # auto | none | required | name:<tool>
    max_tokens: int
    stop: list[str]
    stream: bool
    include_usage: bool


@dataclass
class Answer:
    pieces: list[str]
    tool_calls: list[tuple[str, str, str]]  # (id, name, arguments JSON)
    finish: str  # stop | length | tool_calls
    input_tokens: int
    cached_tokens: int
    response_id: str

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def output_tokens(self) -> int:
        return len(self.pieces) + sum(1 + len(args) // 4 for _, _, args in self.tool_calls)


def deployment(path: str) -> str:
    parts = path.split("/")
    return parts[3] if path.startswith("/openai/deployments/") and len(parts) > 3 else ""


def text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    raise HttpError(400, "Invalid type for 'content': expected a string or an array of content parts")


def parse_openai(data: dict[str, Any], path: str) -> Chat:
    model = str(data.get("model") or deployment(path))
    if not model:
        raise HttpError(400, "you must provide a model parameter")
    raw = data.get("messages")
    if not isinstance(raw, list) or not raw:
        raise HttpError(400, "'messages' must contain at least one message", code="invalid_value")
    messages: list[tuple[str, str]] = []
    for index, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in (
            "system",
            "developer",
            "user",
            "assistant",
            "tool",
        ):
            raise HttpError(400, f"Invalid value for 'messages[{index}].role'", code="invalid_value")
        text = text_of(m.get("content"))
        if m["role"] == "tool" and not m.get("tool_call_id"):
            raise HttpError(400, f"Missing required parameter: 'messages[{index}].tool_call_id'.")
        if m["role"] == "assistant":
            for call in m.get("tool_calls") or []:
                text += f" <call {call['function']['name']}({call['function']['arguments']})>"
        messages.append((str(m["role"]), text))
    temperature = data.get("temperature")
    if temperature is not None and not 0 <= float(temperature) <= 2:
        raise HttpError(
            400,
            f"Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got "
            f"{temperature} instead.",
            code="decimal_above_max_value",
            param="temperature",
        )
    tools = []
    for t in data.get("tools") or []:
        fn = t.get("function", {})
        tools.append((str(fn.get("name", "")), dict(fn.get("parameters") or {})))
    choice = data.get("tool_choice", "auto")
    if isinstance(choice, dict):
        choice = "name:" + str(choice.get("function", {}).get("name", ""))
    stop = data.get("stop") or []
    max_tokens = int(data.get("max_completion_tokens") or data.get("max_tokens") or 0)
    options = data.get("stream_options") or {}
    return Chat(
        "openai",
        model,
        messages,
        tools,
        str(choice),
        max_tokens,
        [stop] if isinstance(stop, str) else list(stop),
        bool(data.get("stream")),
        bool(options.get("include_usage")),
    )


def parse_anthropic(data: dict[str, Any]) -> Chat:
    model = str(data.get("model") or "")
    if not model:
        raise HttpError(400, "model: Field required")
    if "max_tokens" not in data:
        raise HttpError(400, "max_tokens: Field required")
    raw = data.get("messages")
    if not isinstance(raw, list) or not raw:
        raise HttpError(400, "messages: at least one message is required")
    messages: list[tuple[str, str]] = []
    system = data.get("system")
    if system:
        messages.append(("system", text_of(system)))
    for index, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise HttpError(400, f"messages.{index}.role: Input should be 'user' or 'assistant'")
        content = m.get("content")
        role = str(m["role"])
        if isinstance(content, list):
            parts = []
            for block in content:
                kind = block.get("type")
                if kind == "text":
                    parts.append(str(block.get("text", "")))
                elif kind == "tool_use":
                    parts.append(f" <call {block.get('name')}({json.dumps(block.get('input'))})>")
                elif kind == "tool_result":
                    role = "tool"
                    parts.append(text_of(block.get("content")))
                else:
                    raise HttpError(400, f"messages.{index}.content: unsupported block type {kind!r}")
            messages.append((role, "".join(parts)))
        else:
            messages.append((role, text_of(content)))
    temperature = data.get("temperature")
    if temperature is not None and not 0 <= float(temperature) <= 1:
        raise HttpError(400, "temperature: Input should be less than or equal to 1")
    tools = [(str(t.get("name", "")), dict(t.get("input_schema") or {})) for t in data.get("tools") or []]
    choice_raw = data.get("tool_choice") or {"type": "auto"}
    kind = choice_raw.get("type", "auto")
    choice = {"any": "required", "tool": "name:" + str(choice_raw.get("name", ""))}.get(kind, kind)
    return Chat(
        "anthropic",
        model,
        messages,
        tools,
        choice,
        int(data["max_tokens"]),
        list(data.get("stop_sequences") or []),
        bool(data.get("stream")),
        True,
    )


def pick_tool(chat: Chat, last_role: str, last_text: str) -> tuple[str, dict[str, Any]] | None:
    """The sim's tool rule: named/required choices call a tool; `auto` calls the first tool whose
    name appears in the last user message; after a tool result it answers in text."""
    if not chat.tools or chat.tool_choice == "none" or last_role == "tool":
        return None
    if chat.tool_choice.startswith("name:"):
        wanted = chat.tool_choice[5:]
        return next((t for t in chat.tools if t[0] == wanted), chat.tools[0])
    mentioned = next((t for t in chat.tools if t[0] and t[0] in last_text), None)
    if chat.tool_choice == "required":
        return mentioned or chat.tools[0]
    return mentioned


def tool_arguments(schema: dict[str, Any]) -> dict[str, Any]:
    props = schema.get("properties") or {}
    required = schema.get("required") or list(props)
    samples: dict[str, Any] = {
        "string": "sim",
        "integer": 1,
        "number": 1.5,
        "boolean": True,
        "array": [],
        "object": {},
    }
    out: dict[str, Any] = {}
    for name in required:
        spec = props.get(name) or {}
        if spec.get("enum"):
            out[name] = spec["enum"][0]
        else:
            out[name] = samples.get(str(spec.get("type", "string")), "sim")
    return out


_OPENAI_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}
_ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def openai_usage(answer: Answer) -> dict[str, Any]:
    return {
        "prompt_tokens": answer.input_tokens,
        "completion_tokens": answer.output_tokens,
        "total_tokens": answer.input_tokens + answer.output_tokens,
        "prompt_tokens_details": {"cached_tokens": answer.cached_tokens},
    }


def openai_body(chat: Chat, answer: Answer) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer.text or None}
    if answer.tool_calls:
        message["tool_calls"] = [
            {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
            for i, n, a in answer.tool_calls
        ]
    return {
        "id": "chatcmpl-sim" + answer.response_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": chat.model,
        "system_fingerprint": "sim",
        "simulated": True,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": _OPENAI_FINISH[answer.finish]}
        ],
        "usage": openai_usage(answer),
    }


def sse(payload: Any, event: str | None = None) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {data}\n\n"


def openai_frames(chat: Chat, answer: Answer) -> list[tuple[str, bool]]:
    base = {
        "id": "chatcmpl-sim" + answer.response_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": chat.model,
        "system_fingerprint": "sim",
        "simulated": True,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return sse(
            {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        )

    frames = [(chunk({"role": "assistant", "content": ""}), False)]
    frames += [(chunk({"content": piece}), True) for piece in answer.pieces]
    for index, (call_id, name, args) in enumerate(answer.tool_calls):
        frames.append(
            (
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": index,
                                "id": call_id,
                                "type": "function",
                                "function": {"name": name, "arguments": ""},
                            }
                        ]
                    }
                ),
                True,
            )
        )
        for start in range(0, len(args), 8):
            frames.append(
                (
                    chunk(
                        {"tool_calls": [{"index": index, "function": {"arguments": args[start : start + 8]}}]}
                    ),
                    True,
                )
            )
    frames.append((chunk({}, _OPENAI_FINISH[answer.finish]), False))
    if chat.include_usage:
        frames.append((sse({**base, "choices": [], "usage": openai_usage(answer)}), False))
    frames.append((sse("[DONE]"), False))
    return frames


def anthropic_usage(answer: Answer, output: int) -> dict[str, Any]:
    return {
        "input_tokens": answer.input_tokens - answer.cached_tokens,
        "output_tokens": output,
        "cache_read_input_tokens": answer.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def anthropic_body(chat: Chat, answer: Answer) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if answer.text:
        content.append({"type": "text", "text": answer.text})
    for call_id, name, args in answer.tool_calls:
        content.append({"type": "tool_use", "id": call_id, "name": name, "input": json.loads(args)})
    return {
        "id": "msg_sim" + answer.response_id,
        "type": "message",
        "role": "assistant",
        "model": chat.model,
        "content": content,
        "stop_reason": _ANTHROPIC_STOP[answer.finish],
        "stop_sequence": None,
        "usage": anthropic_usage(answer, answer.output_tokens),
        "simulated": True,
    }


def anthropic_frames(chat: Chat, answer: Answer) -> list[tuple[str, bool]]:
    message: dict[str, Any] = {
        "id": "msg_sim" + answer.response_id,
        "type": "message",
        "role": "assistant",
        "model": chat.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": anthropic_usage(answer, 1),
        "simulated": True,
    }
    frames = [(sse({"type": "message_start", "message": message}, "message_start"), False)]
    index = 0
    if answer.pieces:
        frames.append(
            (
                sse(
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    },
                    "content_block_start",
                ),
                False,
            )
        )
        frames.append((sse({"type": "ping"}, "ping"), False))
        for piece in answer.pieces:
            frames.append(
                (
                    sse(
                        {
                            "type": "content_block_delta",
                            "index": 0,
                            "delta": {"type": "text_delta", "text": piece},
                        },
                        "content_block_delta",
                    ),
                    True,
                )
            )
        frames.append((sse({"type": "content_block_stop", "index": 0}, "content_block_stop"), False))
        index = 1
    for call_id, name, args in answer.tool_calls:
        frames.append(
            (
                sse(
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}},
                    },
                    "content_block_start",
                ),
                True,
            )
        )
        for start in range(0, len(args), 8):
            frames.append(
                (
                    sse(
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": args[start : start + 8]},
                        },
                        "content_block_delta",
                    ),
                    True,
                )
            )
        frames.append((sse({"type": "content_block_stop", "index": index}, "content_block_stop"), False))
        index += 1
    frames.append(
        (
            sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": _ANTHROPIC_STOP[answer.finish], "stop_sequence": None},
                    "usage": {"output_tokens": answer.output_tokens},
                },
                "message_delta",
            ),
            False,
        )
    )
    frames.append((sse({"type": "message_stop"}, "message_stop"), False))
    return frames


# --- helpers -----------------------------------------------------------------------------------


def embed_text(text: str, dims: int) -> list[float]:
    """A deterministic unit vector: hashed words and character trigrams, so similar texts are close."""
    vector = [0.0] * dims
    lowered = text.lower()
    features = lowered.split() + [lowered[i : i + 3] for i in range(max(0, len(lowered) - 2))]
    for feature in features:
        digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
        index, sign = struct.unpack("<IxxxB", digest)
        vector[index % dims] += 1.0 if sign & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [round(v / norm, 6) for v in vector]


def header_seconds(value: float) -> str:
    return str(max(1, math.ceil(value)))


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format: 20ms, 1s, 6m0s, 1h2m3s."""
    if seconds < 0.9995:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{secs:.3g}s" if secs != int(secs) else f"{int(secs)}s"
    if minutes or hours:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return text
