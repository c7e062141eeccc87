"""The official `openai` SDKs (Python sync and async, and Node) pointed at Ballast with only
`base_url` and the key changed: completions, streams, tool calls, sessions, models, embeddings,
and the errors the SDKs turn into their own exception types and retries."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import pytest_asyncio
import yaml
from ballast.edge.v1 import edge_pb2
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from services.kit.config import SERVICE_NAMES
from services.router.app import RouterApp
from services.router.sim.server import Fault
from services.testing import Suite, start_suite
from tests.e2e.conftest import ADMIN_KEY, write_test_config
from tests.support.openai_http import http_url

pytestmark = pytest.mark.asyncio(loop_scope="module")

NODE_DIR = Path(__file__).parent / "node"
BYPASS = {"x-ballast-cache": "bypass"}
WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# A tier whose request window is short enough for the SDK to honour its retry-after.
TINY_WINDOW_S = 5


def _config(folder: Path) -> dict[str, str]:
    environ = write_test_config(folder)
    tiers_file = Path(environ["BALLAST_LIMITER_TIERS_FILE"])
    tiers = yaml.safe_load(tiers_file.read_text())
    tiers["tiers"]["tiny"] = {
        "priority": "normal",
        "requests": {"limit": 1, "window": f"{TINY_WINDOW_S}s"},
        "user_tokens_per_day": {"limit": 2000000},
        "tenant_tokens_per_day": {"limit": 50000000},
        "session_tool_calls": {"limit": 25},
    }
    tiers_file.write_text(yaml.safe_dump(tiers))
    return environ


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def suite(tmp_path_factory: Any) -> AsyncIterator[Suite]:
    environ = _config(tmp_path_factory.mktemp("sdk"))
    running = await start_suite(SERVICE_NAMES, environ)
    yield running
    await running.stop(grace=0)  # nothing is asserted after the tests: no drain


async def _key(suite: Suite, tier: str = "paid") -> str:
    created = await suite.edge_admin.CreateApiKey(
        edge_pb2.CreateApiKeyRequest(tenant_id="t" + secrets.token_hex(6), user_id="u", tier=tier),
        metadata=(("x-admin-key", ADMIN_KEY),),
    )
    return created.api_key


@pytest_asyncio.fixture(loop_scope="module")
async def key(suite: Suite) -> str:
    return await _key(suite)


def _sync(suite: Suite, key: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=http_url(suite), api_key=key, **options)


def _async(suite: Suite, key: str, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=http_url(suite), api_key=key, **options)


QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "How do I reset my password?"},
]


async def test_sync_and_async_clients_complete_and_stream_the_same_answer(suite: Suite, key: str) -> None:
    client = _sync(suite, key)
    # The sync client blocks: it runs in a thread while the suite serves on this loop.
    plain = await asyncio.to_thread(
        client.chat.completions.create, model="sim-small", messages=QUESTION, extra_headers=BYPASS
    )
    assert plain.choices[0].message.content and plain.choices[0].message.content.startswith("[simulated")
    assert plain.usage is not None and plain.usage.total_tokens > 0
    assert plain.model == "sim-small" and plain.choices[0].finish_reason == "stop"

    def streamed() -> tuple[str, Any]:
        text, usage = "", None
        for chunk in client.chat.completions.create(
            model="sim-small",
            messages=QUESTION,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=BYPASS,
        ):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        return text, usage

    text, usage = await asyncio.to_thread(streamed)
    assert text == plain.choices[0].message.content and usage == plain.usage
    client.close()

    async with _async(suite, key) as aclient:
        again = await aclient.chat.completions.create(
            model="sim-small", messages=QUESTION, extra_headers=BYPASS
        )
        assert again.choices[0].message.content == plain.choices[0].message.content
        stream = await aclient.chat.completions.create(
            model="sim-small",
            messages=QUESTION,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=BYPASS,
        )
        pieces, ausage = [], None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            ausage = chunk.usage or ausage
        assert "".join(pieces) == plain.choices[0].message.content and ausage == plain.usage
        raw = await aclient.chat.completions.with_raw_response.create(model="sim-small", messages=QUESTION)
        assert raw.headers["x-ballast-request-id"] == raw.request_id


async def test_a_tool_calling_round_trip_plain_and_streamed(suite: Suite, key: str) -> None:
    question: ChatCompletionMessageParam = {"role": "user", "content": "Use get_weather for Paris."}
    async with _async(suite, key, default_headers=BYPASS) as client:
        first = await client.chat.completions.create(model="sim-small", messages=[question], tools=[WEATHER])
        assert first.choices[0].finish_reason == "tool_calls"
        (call,) = first.choices[0].message.tool_calls or []
        assert call.type == "function" and call.function.name == "get_weather"

        async with client.chat.completions.stream(
            model="sim-small", messages=[question], tools=[WEATHER]
        ) as stream:
            async for _ in stream:
                pass
            final = await stream.get_final_completion()
        (streamed_call,) = final.choices[0].message.tool_calls or []
        assert streamed_call.id == call.id and streamed_call.function.arguments == call.function.arguments
        assert final.choices[0].finish_reason == "tool_calls"

        follow_up: list[ChatCompletionMessageParam] = [
            question,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": call.function.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "rain"})},
        ]
        answer = await client.chat.completions.create(model="sim-small", messages=follow_up, tools=[WEATHER])
        assert "Based on the tool result" in (answer.choices[0].message.content or "")
        text = ""
        chunks = await client.chat.completions.create(
            model="sim-small", messages=follow_up, tools=[WEATHER], stream=True
        )
        async for chunk in chunks:
            text += chunk.choices[0].delta.content or ""
        assert text == answer.choices[0].message.content


async def test_a_session_carried_by_header_across_three_turns(suite: Suite, key: str) -> None:
    auth = (("authorization", f"Bearer {key}"),)
    session_id = (
        await suite.edge.CreateSession(edge_pb2.CreateSessionRequest(), metadata=auth)
    ).session.session_id
    async with _async(suite, key, default_headers={"x-ballast-session-id": session_id}) as client:
        for text in ("I am Ada.", "I like tea.", "Who am I?"):
            raw = await client.chat.completions.with_raw_response.create(
                model="sim-small", messages=[{"role": "user", "content": text}]
            )
            raw.parse()
        assert raw.headers["x-ballast-session-version"]
    session = (
        await suite.edge.GetSession(edge_pb2.GetSessionRequest(session_id=session_id), metadata=auth)
    ).session
    assert session.turns == 6


async def test_models_and_embeddings(suite: Suite, key: str) -> None:
    client = _sync(suite, key)
    ids = {m.id for m in await asyncio.to_thread(lambda: list(client.models.list()))}
    assert {"sim-small", "sim-large-eu", "fast", "reasoning", "embedding"} <= ids
    client.close()
    async with _async(suite, key) as aclient:
        result = await aclient.embeddings.create(model="sim-embed", input=["rain in Paris", "sun in Rome"])
        assert len(result.data) == 2 and len(result.data[0].embedding) == 256
        # The SDK asks for base64 by default when numpy is present and decodes it itself.
        assert result.usage.prompt_tokens > 0


class _Counting(httpx2.AsyncBaseTransport):
    """Counts the HTTP requests the SDK actually makes (its retries included)."""

    def __init__(self) -> None:
        self.inner = httpx2.AsyncHTTPTransport()
        self.requests = 0
        self.statuses: list[int] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.requests += 1
        response = await self.inner.handle_async_request(request)
        self.statuses.append(response.status_code)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_429_is_a_rate_limit_error_and_its_retry_after_is_honoured(suite: Suite) -> None:
    tiny = await _key(suite, "tiny")
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
    counting = _Counting()
    async with _async(
        suite, tiny, max_retries=0, http_client=httpx2.AsyncClient(transport=counting)
    ) as client:
        await client.chat.completions.create(model="sim-small", messages=messages)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="sim-small", messages=messages)
    assert counting.requests == 2
    assert caught.value.code == "rate_limit_exceeded" and caught.value.status_code == 429
    assert 0 < float(caught.value.response.headers["retry-after"]) <= TINY_WINDOW_S + 1
    # With retries allowed, the SDK waits the retry-after (a few seconds, far below its two-minute
    # cap) and tries again, by then within a new window: the caller sees only the answer.
    counting = _Counting()
    async with _async(
        suite, tiny, max_retries=3, http_client=httpx2.AsyncClient(transport=counting)
    ) as client:
        await client.chat.completions.create(model="sim-small", messages=messages)
        answer = await client.chat.completions.create(model="sim-small", messages=messages)
    assert answer.choices[0].message.content
    # Each call ends answered; every 429 before it was retried by the SDK, not raised.
    assert counting.statuses.count(200) == 2 and counting.statuses[-1] == 200, counting.statuses
    assert 429 in counting.statuses and set(counting.statuses) == {200, 429}, counting.statuses


async def test_a_spent_budget_is_not_retried(suite: Suite) -> None:
    free = await _key(suite, "free")
    counting = _Counting()
    async with _async(
        suite, free, max_retries=3, http_client=httpx2.AsyncClient(transport=counting)
    ) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(
                model="sim-small", messages=[{"role": "user", "content": "hi"}], max_tokens=500_000
            )
    assert caught.value.code == "insufficient_quota"
    # The budget resets at midnight, beyond the SDK's two-minute cap: it gives up at once.
    assert counting.requests == 1


async def test_a_bad_parameter_is_a_bad_request_error_naming_it(suite: Suite, key: str) -> None:
    async with _async(suite, key) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model="sim-small", messages=[{"role": "user", "content": "hi"}], n=2
            )
        assert caught.value.param == "n"
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model="sim-small", messages=[{"role": "user", "content": "hi"}], temperature=7
            )
        assert caught.value.param == "temperature"
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])
        assert missing.value.code == "model_not_found"
    async with _async(suite, "bk_wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()


async def test_a_provider_outage_is_invisible_to_the_client(suite: Suite, key: str) -> None:
    router = suite.running["router"].app
    assert isinstance(router, RouterApp)
    primary = router.sims["sim-primary"]
    primary.set_fault(Fault(mode="error", status=500))
    counting = _Counting()
    try:
        async with _async(
            suite,
            key,
            max_retries=0,
            default_headers=BYPASS,
            http_client=httpx2.AsyncClient(transport=counting),
        ) as client:
            answer = await client.chat.completions.create(
                model="reasoning", messages=[{"role": "user", "content": "still there?"}]
            )
            text = ""
            async for chunk in await client.chat.completions.create(
                model="reasoning", messages=[{"role": "user", "content": "still there?"}], stream=True
            ):
                text += (
                    chunk.choices[0].delta.content if chunk.choices and chunk.choices[0].delta.content else ""
                )
    finally:
        primary.set_fault(None)
    # One request each, answered by the fallback: the failover happened inside Ballast.
    assert counting.requests == 2
    assert answer.model == "sim-large-eu" and text == answer.choices[0].message.content


async def test_the_node_sdk(suite: Suite, key: str) -> None:
    if shutil.which("node") is None or not (NODE_DIR / "node_modules" / "openai").exists():
        message = "node or the `openai` npm package is missing (make test runs scripts/ensure_node_sdk.sh)"
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(message)
        pytest.skip(message)
    tiny = await _key(suite, "tiny")
    auth = (("authorization", f"Bearer {key}"),)
    session_id = (
        await suite.edge.CreateSession(edge_pb2.CreateSessionRequest(), metadata=auth)
    ).session.session_id
    router = suite.running["router"].app
    assert isinstance(router, RouterApp)
    router.sims["sim-primary"].set_fault(None)
    process = await asyncio.create_subprocess_exec(
        "node",
        str(NODE_DIR / "sdk_check.mjs"),
        cwd=NODE_DIR,
        env={
            **os.environ,
            "BALLAST_BASE_URL": http_url(suite),
            "BALLAST_KEY": key,
            "BALLAST_TINY_KEY": tiny,
            "BALLAST_SESSION_ID": session_id,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 300)
    assert process.returncode == 0, (out + err).decode()
    results = json.loads(out.decode().strip().splitlines()[-1])
    assert results == {
        "plain": True,
        "stream_matches": True,
        "tool_round_trip": True,
        "tool_stream": True,
        "session": True,
        "models": True,
        "embeddings": True,
        "rate_limit_error": True,
        "retried_after_retry_after": True,
        "bad_request_param": "n",
    }, results
    session = (
        await suite.edge.GetSession(edge_pb2.GetSessionRequest(session_id=session_id), metadata=auth)
    ).session
    assert session.turns == 6
