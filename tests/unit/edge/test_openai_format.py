"""The OpenAI wire shapes, byte for byte: SSE chunks (usage, tool-call deltas), error envelopes
and the parameter each edge validation error is reported under.

The golden strings follow OpenAI's API reference for chat completions (the chunk object, the
`stream_options.include_usage` final chunk with empty `choices`, and streamed tool calls whose
first delta carries `index`, `id`, `type` and the function name with empty arguments, followed by
argument fragments carrying only `index` and `function.arguments`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import grpc
import orjson
import pytest
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2
from ballast.router.v1 import router_pb2
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2

from services.edge import openai_format as fmt
from services.kit.errors import (
    DeadlineExceeded,
    Forwarded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

BASE = '"id":"chatcmpl-req_1","object":"chat.completion.chunk","created":1700000000,"model":"sim-small","system_fingerprint":null'


def _writer(include_usage: bool = True) -> fmt.ChunkWriter:
    return fmt.ChunkWriter("req_1", "sim-small", 1700000000, include_usage=include_usage)


def test_role_text_and_finish_chunks_are_framed_as_openai_frames_them() -> None:
    writer = _writer(include_usage=False)
    assert writer.role() == (
        b"data: {" + BASE.encode() + b',"choices":[{"index":0,"delta":{"role":"assistant","content":"",'
        b'"refusal":null},"logprobs":null,"finish_reason":null}]}\n\n'
    )
    assert writer.text("Hel") == (
        b"data: {" + BASE.encode() + b',"choices":[{"index":0,"delta":{"content":"Hel"},"logprobs":null,'
        b'"finish_reason":null}]}\n\n'
    )
    assert writer.finish(common_pb2.FINISH_REASON_LENGTH) == (
        b"data: {" + BASE.encode() + b',"choices":[{"index":0,"delta":{},"logprobs":null,'
        b'"finish_reason":"length"}]}\n\n'
    )
    assert fmt.DONE == b"data: [DONE]\n\n"


def test_with_include_usage_every_chunk_has_null_usage_and_the_last_has_empty_choices() -> None:
    writer = _writer()
    assert writer.text("a").endswith(b',"finish_reason":null}],"usage":null}\n\n')
    usage = common_pb2.Usage(input_tokens=12, output_tokens=30, cached_input_tokens=4, total_tokens=42)
    assert writer.usage(usage) == (
        b"data: {" + BASE.encode() + b',"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":30,'
        b'"total_tokens":42,"prompt_tokens_details":{"cached_tokens":4}}}\n\n'
    )


def test_tool_call_deltas_carry_id_type_and_name_first_then_argument_fragments_only() -> None:
    writer = _writer(include_usage=False)
    first = writer.tool_calls(
        [router_pb2.ToolCallDelta(index=0, id="call_abc", name="get_weather", arguments_json_fragment="")]
    )
    assert first == (
        b"data: {" + BASE.encode() + b',"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,'
        b'"id":"call_abc","type":"function","function":{"name":"get_weather","arguments":""}}]},'
        b'"logprobs":null,"finish_reason":null}]}\n\n'
    )
    fragment = writer.tool_calls([router_pb2.ToolCallDelta(index=0, arguments_json_fragment='{"city":')])
    assert fragment == (
        b"data: {" + BASE.encode() + b',"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,'
        b'"function":{"arguments":"{\\"city\\":"}}]},"logprobs":null,"finish_reason":null}]}\n\n'
    )
    # A second call in the same answer starts with its own id at the next index.
    second = json.loads(
        writer.tool_calls([router_pb2.ToolCallDelta(index=1, id="call_def", name="get_time")])[6:]
    )
    assert second["choices"][0]["delta"]["tool_calls"] == [
        {"index": 1, "id": "call_def", "type": "function", "function": {"name": "get_time", "arguments": ""}}
    ]
    assert writer.finish(common_pb2.FINISH_REASON_TOOL_CALLS).endswith(b'"finish_reason":"tool_calls"}]}\n\n')


def test_an_error_event_carries_the_envelope() -> None:
    body = fmt.http_error(Unavailable("every provider is down")).body
    assert fmt.error_event(body) == (
        b'event: error\ndata: {"error":{"message":"every provider is down","type":"server_error",'
        b'"param":null,"code":"service_unavailable"}}\n\n'
    )


def _parse(body: Mapping[str, object], headers: dict[str, str] | None = None) -> fmt.ChatCall:
    return fmt.parse_chat(body, headers or {})


def test_leading_system_and_developer_messages_become_the_system_prompt() -> None:
    call = _parse(
        {
            "model": "sim-small",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
                {"role": "user", "content": "Weather?", "name": "ada"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "rain"},
            ],
            "temperature": 0.2,
            "top_p": 1,
            "max_completion_tokens": 50,
            "stop": "END",
            "seed": 7,
            "response_format": {"type": "text"},
            "n": 1,
            "user": "ignored",
        }
    )
    request = call.request
    assert request.system_prompt == "Be brief.\n\nUse metric units."
    assert [m.role for m in request.messages] == [
        common_pb2.ROLE_USER,
        common_pb2.ROLE_ASSISTANT,
        common_pb2.ROLE_TOOL,
    ]
    assert request.messages[0].name == "ada"
    assert request.messages[1].tool_calls[0].arguments_json == "{}"
    assert request.messages[2].tool_call_id == "c1"
    assert call.origin == [2, 3, 4]
    params = request.params
    assert (params.temperature, params.top_p, params.max_output_tokens, list(params.stop), params.seed) == (
        0.2,
        1.0,
        50,
        ["END"],
        7,
    )
    assert call.max_tokens_param == "max_completion_tokens"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type",
        ),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": -1}, "top_p"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 2**64}, "max_completion_tokens"),
        ({"seed": "x"}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"n": 2}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"tools": {}}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools[0].function.parameters",
        ),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"bogus": 1}, "bogus"),
        ({"model": 42}, "model"),
    ],
)
def test_bad_parameters_are_named(body: dict[str, object], param: str) -> None:
    full: dict[str, object] = {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}], **body}
    with pytest.raises(InvalidArgument) as caught:
        _parse(full)
    assert caught.value.field == param
    error = fmt.http_error(caught.value)
    assert error.status == 400
    assert orjson.loads(error.body)["error"]["param"] == param


def test_penalties_and_flags_at_their_defaults_are_accepted() -> None:
    _parse(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "frequency_penalty": 0,
            "presence_penalty": 0.0,
            "logprobs": False,
            "logit_bias": {},
            "parallel_tool_calls": True,
            "store": False,
        }
    )


def test_headers_set_session_cache_and_idempotency_and_unknown_cache_modes_are_refused() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    call = _parse(
        body,
        {"x-ballast-session-id": "s1", "x-ballast-cache": "exact-only", "x-ballast-idempotency-key": "k"},
    )
    assert (call.request.session_id, call.request.idempotency_key) == ("s1", "k")
    with pytest.raises(InvalidArgument) as caught:
        _parse(body, {"x-ballast-cache": "sometimes"})
    assert caught.value.field == "x-ballast-cache"


def test_edge_validation_fields_map_back_to_openai_parameters() -> None:
    call = fmt.ChatCall(request=edge_pb2.ChatRequest(), origin=[1, 2, 3], max_tokens_param="max_tokens")
    cases = {
        "messages[1].tool_calls[0].arguments_json": "messages[2].tool_calls[0].function.arguments",
        "messages[0].tool_calls[2].name": "messages[1].tool_calls[2].function.name",
        "messages[2].content": "messages[3].content",
        "tools[4].parameters_json_schema": "tools[4].function.parameters",
        "tools[0].name": "tools[0].function.name",
        "params.max_output_tokens": "max_tokens",
        "params.temperature": "temperature",
        "session_id": "x-ballast-session-id",
        "idempotency_key": "x-ballast-idempotency-key",
        "tool_choice.name": "tool_choice",
        "messages": "messages",
    }
    for edge_field, param in cases.items():
        assert fmt.openai_param(edge_field, call) == param


def _packed(message: object) -> any_pb2.Any:
    holder = any_pb2.Any()
    holder.Pack(message)  # type: ignore[arg-type]
    return holder


def test_statuses_follow_what_the_sdks_expect() -> None:
    assert fmt.http_error(Unauthenticated("invalid or revoked API key")).status == 401
    assert fmt.http_error(NotFound("session 's' not found")).status == 404
    assert fmt.http_error(Unavailable("down")).status == 503
    assert fmt.http_error(DeadlineExceeded("late")).status == 504
    unknown_model = Forwarded(
        grpc.StatusCode.INVALID_ARGUMENT,
        "model: unknown model or alias 'x'",
        [
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field="model", description="unknown model or alias 'x'"
                        )
                    ]
                )
            )
        ],
    )
    error = fmt.http_error(unknown_model)
    assert error.status == 404
    assert orjson.loads(error.body)["error"] == {
        "message": "model: unknown model or alias 'x'",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_a_rate_limit_carries_retry_after_and_openai_rate_limit_headers() -> None:
    limited = ResourceExhausted("rate limited by requests", retry_after=2.4, reason="requests")
    limited.trailing = (
        ("x-ratelimit-limit", "3"),
        ("x-ratelimit-remaining", "0"),
        ("x-ratelimit-reset", "2.400"),
        ("x-ratelimit-policy", "requests"),
    )
    error = fmt.http_error(limited)
    headers = dict(error.headers)
    assert error.status == 429
    assert headers[b"retry-after"] == b"3" and headers[b"retry-after-ms"] == b"2400"
    assert headers[b"x-ratelimit-limit-requests"] == b"3"
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    assert headers[b"x-ratelimit-reset-requests"] == b"3s"
    body = orjson.loads(error.body)["error"]
    assert (body["type"], body["code"]) == ("requests", "rate_limit_exceeded")
    assert b"x-should-retry" not in headers


def test_a_spent_token_budget_is_insufficient_quota() -> None:
    spent = Forwarded(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "budget spent",
        [
            _packed(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=36000))),
            _packed(error_details_pb2.ErrorInfo(reason="user_tokens_per_day", domain="ballast")),
        ],
    )
    error = fmt.http_error(spent, max_retry_wait=60)
    assert error.status == 429
    assert dict(error.headers)[b"retry-after"] == b"36000"
    # Longer than the SDKs should wait: they are told not to retry.
    assert dict(error.headers)[b"x-should-retry"] == b"false"
    body = orjson.loads(error.body)["error"]
    assert (body["type"], body["code"]) == ("insufficient_quota", "insufficient_quota")


def test_openai_durations() -> None:
    assert [fmt.openai_duration(s) for s in (0.02, 1, 59.5, 360, 3723)] == [
        "20ms",
        "1s",
        "1m0s",
        "6m0s",
        "1h2m3s",
    ]
