"""The edge's OpenAI-compatible HTTP face end to end, over real HTTP against the whole suite:
the answers, the headers, every kind of bad input and the error each one gets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import orjson
import pytest
import pytest_asyncio
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2

from services.router.app import RouterApp
from services.router.sim.server import Fault
from services.testing import Suite
from tests.e2e.conftest import Tenant, new_tenant
from tests.support.openai_http import http_url

pytestmark = pytest.mark.asyncio(loop_scope="module")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
BYPASS = {"x-ballast-cache": "bypass"}


@pytest_asyncio.fixture(loop_scope="module")
async def http(suite: Suite) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=http_url(suite), timeout=60) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module")
async def tenant(suite: Suite) -> Tenant:
    return await new_tenant(suite)


def _auth(tenant: Tenant, tier: str = "paid", **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {tenant.keys[tier]}", **extra}


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


async def _chat(http: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> httpx.Response:
    return await http.post("/chat/completions", headers=headers, json={"model": "sim-small", **body})


async def test_a_completion_answers_in_openai_shape_with_ballast_headers(
    http: httpx.AsyncClient, tenant: Tenant
) -> None:
    response = await _chat(
        http,
        _auth(tenant),
        messages=[{"role": "system", "content": "Be brief."}, _user("How do I reset my password?")],
        temperature=0,
        top_p=1,
        max_tokens=200,
        seed=3,
        stop=["\n\n"],
        response_format={"type": "text"},
        n=1,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "sim-small"
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith("[simulated")
    assert (
        body["usage"]["total_tokens"]
        == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        > 0
    )
    headers = response.headers
    assert (
        headers["x-ballast-request-id"].startswith("req_")
        and body["id"] == "chatcmpl-" + headers["x-request-id"]
    )
    assert headers["x-ballast-cache-hit"] == "false" and headers["x-ballast-simulated"] == "true"
    assert int(headers["x-ratelimit-limit-requests"]) == 200
    assert int(headers["x-ratelimit-remaining-requests"]) < 200
    again = await _chat(
        http,
        _auth(tenant),
        messages=[{"role": "system", "content": "Be brief."}, _user("How do I reset my password?")],
        temperature=0,
        top_p=1,
        max_tokens=200,
        seed=3,
        stop=["\n\n"],
    )
    assert again.headers["x-ballast-cache-hit"] == "true"
    assert again.json()["choices"][0]["message"]["content"] == choice["message"]["content"]


async def test_max_tokens_truncates_with_finish_reason_length(
    http: httpx.AsyncClient, tenant: Tenant
) -> None:
    response = await _chat(
        http, _auth(tenant, **BYPASS), messages=[_user("tell me a long story")], max_completion_tokens=3
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"


async def test_a_tool_call_round_trip(http: httpx.AsyncClient, tenant: Tenant) -> None:
    question = _user("Should I pack an umbrella? Use get_weather for Paris.")
    first = await _chat(
        http, _auth(tenant, **BYPASS), messages=[question], tools=[WEATHER], tool_choice="auto"
    )
    assert first.status_code == 200, first.text
    choice = first.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert orjson.loads(call["function"]["arguments"]) == {"city": "sim"}
    second = await _chat(
        http,
        _auth(tenant, **BYPASS),
        messages=[
            question,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": '{"forecast": "rain"}'},
        ],
        tools=[WEATHER],
    )
    assert second.status_code == 200, second.text
    answer = second.json()["choices"][0]
    assert answer["finish_reason"] == "stop" and "Based on the tool result" in answer["message"]["content"]


def _events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n")
    return raw[:-2].split(b"\n\n")


async def _stream(
    http: httpx.AsyncClient, headers: dict[str, str], **body: Any
) -> tuple[httpx.Response, list[bytes]]:
    async with http.stream(
        "POST", "/chat/completions", headers=headers, json={"model": "sim-small", "stream": True, **body}
    ) as response:
        raw = await response.aread()
    return response, _events(raw) if response.status_code == 200 else []


async def test_a_stream_reassembles_to_the_plain_answer_with_the_same_usage(
    http: httpx.AsyncClient, tenant: Tenant
) -> None:
    messages = [_user("Explain rate limits in one paragraph.")]
    plain = (await _chat(http, _auth(tenant, **BYPASS), messages=messages)).json()
    response, events = await _stream(
        http, _auth(tenant, **BYPASS), messages=messages, stream_options={"include_usage": True}
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-ballast-request-id"].startswith("req_")
    assert events[-1] == b"data: [DONE]"
    chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "sim-small" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    # Every chunk but the last carries "usage": null; the last has empty choices and the usage.
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == plain["choices"][0]["message"]["content"]


async def test_streamed_tool_calls_come_as_openai_deltas(http: httpx.AsyncClient, tenant: Tenant) -> None:
    _, events = await _stream(
        http, _auth(tenant, **BYPASS), messages=[_user("Use get_weather for Oslo")], tools=[WEATHER]
    )
    chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert "usage" not in chunks[0]  # without include_usage, no usage key at all
    calls = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["index"] == 0 and calls[0]["id"] and calls[0]["type"] == "function"
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["function"]["arguments"] == ""
    assert len(calls) > 2 and all(
        set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in calls[1:]
    )
    assert orjson.loads("".join(d["function"]["arguments"] for d in calls)) == {"city": "sim"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert events[-1] == b"data: [DONE]"


def _router(suite: Suite) -> RouterApp:
    app = suite.running["router"].app
    assert isinstance(app, RouterApp)
    return app


async def test_a_stream_that_breaks_after_the_first_token_ends_with_an_error_event(
    suite: Suite, http: httpx.AsyncClient, tenant: Tenant
) -> None:
    primary = _router(suite).sims["sim-primary"]
    primary.set_fault(Fault(mode="break", after_tokens=1))
    try:
        response, events = await _stream(http, _auth(tenant, **BYPASS), messages=[_user("break please")])
    finally:
        primary.set_fault(None)
    assert response.status_code == 200
    assert b"data: [DONE]" not in events
    assert events[-1].startswith(b"event: error\ndata: ")
    error = orjson.loads(events[-1].split(b"data: ", 1)[1])["error"]
    assert error["type"] == "server_error" and error["message"]
    assert any(b'"content":"[simulated' in e for e in events)


async def test_a_provider_outage_fails_over_invisibly_and_all_down_is_503(
    suite: Suite, http: httpx.AsyncClient, tenant: Tenant
) -> None:
    sims = _router(suite).sims
    sims["sim-primary"].set_fault(Fault(mode="error", status=500))
    try:
        response = await _chat(
            http, _auth(tenant, **BYPASS), model="reasoning", messages=[_user("still there?")]
        )
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "sim-large-eu"
        sims["sim-secondary"].set_fault(Fault(mode="error", status=500))
        down = await _chat(http, _auth(tenant, **BYPASS), model="reasoning", messages=[_user("anyone?")])
        streamed, _ = await _stream(
            http, _auth(tenant, **BYPASS), model="reasoning", messages=[_user("anyone?")]
        )
    finally:
        for sim in sims.values():
            sim.set_fault(None)
    assert down.status_code == 503 and _error(down)["type"] == "server_error"
    # Before the first token a stream can still say so with a status.
    assert streamed.status_code == 503


async def test_a_session_carried_by_header_across_three_turns(
    suite: Suite, http: httpx.AsyncClient, tenant: Tenant
) -> None:
    grpc_auth = tenant.auth("paid")
    session_id = (
        await suite.edge.CreateSession(edge_pb2.CreateSessionRequest(), metadata=grpc_auth)
    ).session.session_id
    headers = _auth(tenant, **{"x-ballast-session-id": session_id})
    versions = []
    for turn in ("My name is Ada.", "I like tea.", "What do you know about me?"):
        response = await _chat(
            http, headers, messages=[{"role": "system", "content": "Be kind."}, _user(turn)]
        )
        assert response.status_code == 200, response.text
        versions.append(int(response.headers["x-ballast-session-version"]))
    assert versions == sorted(versions) and len(set(versions)) == 3
    session = (
        await suite.edge.GetSession(edge_pb2.GetSessionRequest(session_id=session_id), metadata=grpc_auth)
    ).session
    # Three user turns and three answers; the system prompt is not recorded.
    assert session.turns == 6


async def test_another_tenants_session_gets_what_grpc_gives(
    suite: Suite, http: httpx.AsyncClient, tenant: Tenant
) -> None:
    other = await new_tenant(suite)
    theirs = (
        await suite.edge.CreateSession(edge_pb2.CreateSessionRequest(), metadata=other.auth("paid"))
    ).session.session_id
    response = await _chat(http, _auth(tenant, **{"x-ballast-session-id": theirs}), messages=[_user("hi")])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.edge.Chat(
            edge_pb2.ChatRequest(
                session_id=theirs, messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hi")]
            ),
            metadata=tenant.auth("paid"),
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert response.status_code == 404
    assert _error(response)["message"] == caught.value.details()


async def test_models_and_embeddings(http: httpx.AsyncClient, tenant: Tenant) -> None:
    models = await http.get("/models", headers=_auth(tenant))
    assert models.status_code == 200
    ids = {m["id"] for m in models.json()["data"]}
    assert {"sim-small", "sim-large-eu", "fast", "reasoning", "embedding"} <= ids
    one = await http.get("/models/fast", headers=_auth(tenant))
    assert one.status_code == 200 and one.json()["owned_by"] == "ballast"
    missing = await http.get("/models/nope", headers=_auth(tenant))
    assert missing.status_code == 404 and _error(missing)["code"] == "model_not_found"
    assert (await http.get("/models")).status_code == 401
    embedded = await http.post(
        "/embeddings",
        headers=_auth(tenant),
        json={"model": "sim-embed", "input": ["rain in Paris", "rain in Rome"]},
    )
    assert embedded.status_code == 200, embedded.text
    body = embedded.json()
    assert [d["index"] for d in body["data"]] == [0, 1] and len(body["data"][0]["embedding"]) == 256
    assert body["usage"]["prompt_tokens"] > 0
    packed = await http.post(
        "/embeddings",
        headers=_auth(tenant),
        json={"model": "sim-embed", "input": "x", "encoding_format": "base64"},
    )
    assert isinstance(packed.json()["data"][0]["embedding"], str)
    bad = await http.post("/embeddings", headers=_auth(tenant), json={"model": "sim-embed", "input": [""]})
    assert bad.status_code == 400 and _error(bad)["param"] == "input[0]"
    wrong_kind = await http.post(
        "/embeddings", headers=_auth(tenant), json={"model": "sim-small", "input": "x"}
    )
    assert wrong_kind.status_code == 400 and _error(wrong_kind)["param"] == "model"


@pytest.mark.parametrize(
    ("headers", "body", "status", "param"),
    [
        ({}, {"n": 2}, 400, "n"),
        ({}, {"temperature": "hot"}, 400, "temperature"),
        ({}, {"messages": "hello"}, 400, "messages"),
        ({}, {"bogus": True}, 400, "bogus"),
        (
            {},
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            400,
            "response_format",
        ),
        # The edge's own validation, reported under the caller's parameter names and indices.
        (
            {},
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    _user("q"),
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}
                        ],
                    },
                    {"role": "tool", "tool_call_id": "c", "content": "r"},
                ]
            },
            400,
            "messages[2].tool_calls[0].function.arguments",
        ),
        ({}, {"messages": [_user("q"), {"role": "assistant", "content": "a"}]}, 400, "messages"),
        ({}, {"tools": [WEATHER, WEATHER]}, 400, "tools[1].function.name"),
        (
            {},
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]},
            400,
            "tool_choice",
        ),
        ({"x-ballast-cache": "sometimes"}, {}, 400, "x-ballast-cache"),
        ({"x-ballast-session-id": "not a valid id!"}, {}, 400, "x-ballast-session-id"),
        ({"x-ballast-idempotency-key": "k" * 129}, {}, 400, "x-ballast-idempotency-key"),
        ({}, {"model": "no-such-model"}, 404, "model"),
    ],
)
async def test_bad_input_is_refused_naming_the_parameter(
    http: httpx.AsyncClient,
    tenant: Tenant,
    headers: dict[str, str],
    body: dict[str, Any],
    status: int,
    param: str,
) -> None:
    response = await _chat(http, _auth(tenant, **headers), **{"messages": [_user("hi")], **body})
    assert response.status_code == status, response.text
    assert _error(response)["param"] == param


async def test_bad_bodies_keys_and_routes(http: httpx.AsyncClient, tenant: Tenant) -> None:
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        response = await http.post("/chat/completions", headers=_auth(tenant), content=raw)
        assert response.status_code == 400 and _error(response)["param"] == "body"
    anonymous = await http.post("/chat/completions", json={"messages": [_user("hi")]})
    assert anonymous.status_code == 401 and _error(anonymous)["code"] == "invalid_api_key"
    forged = await http.post(
        "/chat/completions", headers={"authorization": "Bearer bk_forged"}, json={"messages": [_user("hi")]}
    )
    assert forged.status_code == 401
    assert (await http.get("/chat/completions", headers=_auth(tenant))).status_code == 405
    assert (await http.get("/../admin", headers=_auth(tenant))).status_code == 404


async def test_a_rate_limit_is_429_with_retry_after_and_a_spent_budget_is_insufficient_quota(
    http: httpx.AsyncClient, suite: Suite
) -> None:
    tenant = await new_tenant(suite)
    # The free tier in tests allows 3 requests an hour.
    statuses = []
    for index in range(4):
        response = await _chat(http, _auth(tenant, "free", **BYPASS), messages=[_user(f"question {index}")])
        statuses.append(response.status_code)
    assert statuses == [200, 200, 200, 429]
    error = _error(response)
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert int(response.headers["retry-after"]) >= 1 and int(response.headers["retry-after-ms"]) > 0
    assert response.headers["x-ratelimit-limit-requests"] == "3"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    # Reserving more output tokens than the daily budget holds is refused as spent quota.
    other = await new_tenant(suite)
    spent = await _chat(http, _auth(other, "free"), messages=[_user("hi")], max_tokens=500_000)
    assert spent.status_code == 429
    assert _error(spent)["type"] == "insufficient_quota"
