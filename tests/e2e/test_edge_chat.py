"""The public API end to end: every service real, on embedded defaults, through gRPC."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import pytest
import pytest_asyncio
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.edge.jobs import verify
from services.kit.config import SERVICE_NAMES
from services.testing import Suite, start_suite
from tests.e2e.conftest import WEBHOOK_SECRET, new_tenant, write_test_config
from tests.support.http_receiver import HttpReceiver
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

USER, TOOL = common_pb2.ROLE_USER, common_pb2.ROLE_TOOL
WEATHER = common_pb2.ToolDefinition(
    name="get_weather",
    description="Current weather for a city",
    parameters_json_schema=json.dumps(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    ),
)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def suite(tmp_path_factory: Any) -> AsyncIterator[Suite]:
    # The webhook receiver listens on loopback, which webhooks reach only when an operator allows it.
    environ = {
        **write_test_config(tmp_path_factory.mktemp("e2e")),
        "BALLAST_EDGE_WEBHOOK_ALLOWED": "127.0.0.1/32",
    }
    running = await start_suite(SERVICE_NAMES, environ)
    yield running
    await running.stop(grace=0)  # nothing is asserted after the tests: no drain


def user(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=USER, content=text)


async def test_multi_turn_conversation_with_tool_calls(suite: Suite) -> None:
    tenant = await new_tenant(suite)
    auth = tenant.auth("paid")
    created = await suite.edge.CreateSession(edge_pb2.CreateSessionRequest(title="trip"), metadata=auth)
    session_id = created.session.session_id
    first = await suite.edge.Chat(
        edge_pb2.ChatRequest(
            session_id=session_id,
            messages=[user("Should I pack an umbrella? Use get_weather for Paris.")],
            tools=[WEATHER],
        ),
        metadata=auth,
    )
    assert first.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    assert first.simulated and not first.cache_hit
    (call,) = first.message.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments_json)
    assert first.usage.total_tokens > 0 and first.cost.total_cost_micros > 0
    assert first.session_version == 1

    begin = await suite.edge.BeginToolCall(
        edge_pb2.BeginToolCallRequest(
            session_id=session_id, tool_name="get_weather", arguments_json=call.arguments_json, use_cache=True
        ),
        metadata=auth,
    )
    assert not begin.cache_hit and begin.tool_calls_used == 1 and begin.tool_calls_limit == 25
    await suite.edge.RecordToolResult(
        edge_pb2.RecordToolResultRequest(
            session_id=session_id,
            tool_name="get_weather",
            arguments_json=call.arguments_json,
            tool_call_id=call.id,
            result='{"forecast": "rain"}',
            cacheable=True,
        ),
        metadata=auth,
    )
    second = await suite.edge.Chat(
        edge_pb2.ChatRequest(
            session_id=session_id,
            messages=[
                common_pb2.ChatMessage(role=TOOL, tool_call_id=call.id, content='{"forecast": "rain"}')
            ],
            tools=[WEATHER],
        ),
        metadata=auth,
    )
    assert second.finish_reason == common_pb2.FINISH_REASON_STOP and second.message.content
    assert second.session_version == 2
    session = await suite.edge.GetSession(edge_pb2.GetSessionRequest(session_id=session_id), metadata=auth)
    # user, assistant (tool call), tool result, assistant
    assert session.session.turns == 4 and session.session.version == 2
    assert session.session.output_tokens > 0
    again = await suite.edge.BeginToolCall(
        edge_pb2.BeginToolCallRequest(
            session_id=session_id, tool_name="get_weather", arguments_json=call.arguments_json, use_cache=True
        ),
        metadata=auth,
    )
    assert again.cache_hit and again.cached_result == '{"forecast": "rain"}' and again.tool_calls_used == 2
    listed = await suite.edge.ListSessions(edge_pb2.ListSessionsRequest(), metadata=auth)
    assert [s.session_id for s in listed.sessions] == [session_id]


async def test_a_repeated_question_is_served_from_the_cache(suite: Suite) -> None:
    tenant = await new_tenant(suite)
    question = edge_pb2.ChatRequest(messages=[user("How do I reset my password?")])
    first = await suite.edge.Chat(question, metadata=tenant.auth())
    assert not first.cache_hit and first.usage.output_tokens > 0
    second = await suite.edge.Chat(question, metadata=tenant.auth())
    assert second.cache_hit and second.cache_similarity == pytest.approx(1.0)
    assert second.message.content == first.message.content
    assert second.usage.total_tokens == 0 and second.cost.total_cost_micros == 0
    # Another tenant asking the same question is not served this tenant's answer.
    other = await new_tenant(suite)
    third = await suite.edge.Chat(question, metadata=other.auth())
    assert not third.cache_hit
    # The caller can opt out of the cache.
    bypass = edge_pb2.ChatRequest(messages=question.messages, cache_mode=edge_pb2.CACHE_MODE_BYPASS)
    assert not (await suite.edge.Chat(bypass, metadata=tenant.auth())).cache_hit


async def test_streamed_chat_matches_its_final_answer(suite: Suite) -> None:
    tenant = await new_tenant(suite)
    events = [
        event
        async for event in suite.edge.ChatStream(
            edge_pb2.ChatStreamRequest(
                chat=edge_pb2.ChatRequest(messages=[user("Tell me about streaming.")])
            ),
            metadata=tenant.auth(),
        )
    ]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "delta" in kinds
    text = "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")
    assert text == events[-1].done.message.content and text
    assert events[-1].done.usage.output_tokens > 0
    # The same question streamed again is replayed from the cache.
    replay = [
        e
        async for e in suite.edge.ChatStream(
            edge_pb2.ChatStreamRequest(
                chat=edge_pb2.ChatRequest(messages=[user("Tell me about streaming.")])
            ),
            metadata=tenant.auth(),
        )
    ]
    assert replay[0].start.cache_hit and replay[-1].done.cache_hit
    assert "".join(e.delta.text for e in replay if e.WhichOneof("event") == "delta") == text


async def test_a_free_user_is_stopped_at_the_limit_with_retry_after(suite: Suite) -> None:
    tenant = await new_tenant(suite)
    for index in range(3):
        call = suite.edge.Chat(
            edge_pb2.ChatRequest(messages=[user(f"question {index}")]), metadata=tenant.auth("free")
        )
        await call
        trailing = dict(await call.trailing_metadata())
        assert trailing["x-ratelimit-remaining"] == str(2 - index)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.edge.Chat(edge_pb2.ChatRequest(messages=[user("one more")]), metadata=tenant.auth("free"))
    error = info.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(error)
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in status.details if d.Is(retry.DESCRIPTOR))
    assert retry.retry_delay.ToMilliseconds() > 0
    trailing = dict(error.trailing_metadata() or ())
    assert trailing["x-ratelimit-remaining"] == "0" and trailing["x-ratelimit-limit"] == "3"
    # Paid users of the same tenant are not affected.
    await suite.edge.Chat(
        edge_pb2.ChatRequest(messages=[user("paid question")]), metadata=tenant.auth("paid")
    )


async def test_an_agent_is_stopped_at_the_tool_call_cap(suite: Suite) -> None:
    tenant = await new_tenant(suite)
    auth = tenant.auth("free")
    session = await suite.edge.CreateSession(edge_pb2.CreateSessionRequest(), metadata=auth)
    request = edge_pb2.BeginToolCallRequest(
        session_id=session.session.session_id, tool_name="search", arguments_json="{}"
    )
    for _ in range(2):
        await suite.edge.BeginToolCall(request, metadata=auth)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.edge.BeginToolCall(request, metadata=auth)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tool-call cap" in (info.value.details() or "")


async def test_a_queued_burst_completes_with_signed_webhooks(suite: Suite) -> None:
    tenant = await new_tenant(suite)
    receiver = HttpReceiver()
    await receiver.start()
    try:
        jobs = []
        for index in range(12):
            tier = ("free", "paid", "enterprise")[index % 3]
            submitted = await suite.edge.SubmitChat(
                edge_pb2.SubmitChatRequest(
                    chat=edge_pb2.ChatRequest(messages=[user(f"burst question {index}")]),
                    webhook_url=receiver.url,
                ),
                metadata=tenant.auth(tier),
            )
            assert submitted.job.state == edge_pb2.JOB_STATE_QUEUED
            jobs.append((submitted.job.job_id, tier))
        # Free users may hold 3 requests an hour here: their 4 jobs include one that waits for quota.
        await receiver.wait_for(11, within=30)
        delivered = {}
        for hook in receiver.received:
            assert verify(
                WEBHOOK_SECRET,
                hook.headers["x-ballast-timestamp"],
                hook.body,
                hook.headers["x-ballast-signature"],
            )
            payload = json.loads(hook.body)
            delivered[payload["job_id"]] = payload
        for job_id, tier in jobs:
            job = (
                await suite.edge.GetJob(edge_pb2.GetJobRequest(job_id=job_id), metadata=tenant.auth(tier))
            ).job
            if job.state == edge_pb2.JOB_STATE_SUCCEEDED:
                assert job.result.message.content and job.webhook_state in ("delivered", "pending")
                assert delivered.get(job_id, {}).get("state") in (None, "JOB_STATE_SUCCEEDED")
            else:
                assert tier == "free" and job.state == edge_pb2.JOB_STATE_QUEUED, job
        assert sum(1 for p in delivered.values() if p["state"] == "JOB_STATE_SUCCEEDED") == 11
        # The free user's fourth job waits for quota in the queue; it can still be cancelled.
        (waiting,) = [job_id for job_id, _ in jobs if job_id not in delivered]
        cancelled = await suite.edge.CancelJob(
            edge_pb2.CancelJobRequest(job_id=waiting), metadata=tenant.auth("free")
        )
        assert cancelled.job.state == edge_pb2.JOB_STATE_CANCELLED
    finally:
        await receiver.close()


async def test_usage_reports_tokens_and_quotas(suite: Suite) -> None:
    tenant = await new_tenant(suite)
    await suite.edge.Chat(edge_pb2.ChatRequest(messages=[user("count my tokens")]), metadata=tenant.auth())
    await asyncio.sleep(0)
    usage = await suite.edge.GetUsage(edge_pb2.GetUsageRequest(), metadata=tenant.auth())
    assert usage.tier == "paid" and usage.tokens_today > 0 and usage.cost_micros_today > 0
    assert usage.quotas


async def test_a_chat_that_fails_after_its_check_gives_its_reservation_back(suite: Suite) -> None:
    """The limiter reserves a chat's tokens before the session's context is read; a chat whose
    context cannot be read (no such session) fails, and its reservation is released."""
    tenant = await new_tenant(suite)
    auth = tenant.auth("paid")

    async def tokens_left() -> dict[str, int]:
        usage = await suite.edge.GetUsage(edge_pb2.GetUsageRequest(), metadata=auth)
        return {q.name: q.remaining for q in usage.quotas if "token" in q.name}

    before = await tokens_left()
    assert before, "the paid tier has a token budget"
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await suite.edge.Chat(
                edge_pb2.ChatRequest(session_id="s-does-not-exist", messages=[user("hello?")]), metadata=auth
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value
    assert await tokens_left() == before


async def test_another_tenant_cannot_touch_sessions_or_jobs(suite: Suite) -> None:
    owner, intruder = await new_tenant(suite), await new_tenant(suite)
    session_id = (
        await suite.edge.CreateSession(edge_pb2.CreateSessionRequest(), metadata=owner.auth())
    ).session.session_id
    job_id = (
        await suite.edge.SubmitChat(
            edge_pb2.SubmitChatRequest(chat=edge_pb2.ChatRequest(messages=[user("mine")])),
            metadata=owner.auth(),
        )
    ).job.job_id
    calls: list[Awaitable[Any]] = [
        suite.edge.GetSession(edge_pb2.GetSessionRequest(session_id=session_id), metadata=intruder.auth()),
        suite.edge.DeleteSession(
            edge_pb2.DeleteSessionRequest(session_id=session_id), metadata=intruder.auth()
        ),
        suite.edge.Chat(
            edge_pb2.ChatRequest(session_id=session_id, messages=[user("hi")]), metadata=intruder.auth()
        ),
        suite.edge.BeginToolCall(
            edge_pb2.BeginToolCallRequest(session_id=session_id, tool_name="t"), metadata=intruder.auth()
        ),
        suite.edge.RecordToolResult(
            edge_pb2.RecordToolResultRequest(session_id=session_id, tool_name="t", result="x"),
            metadata=intruder.auth(),
        ),
        suite.edge.GetJob(edge_pb2.GetJobRequest(job_id=job_id), metadata=intruder.auth()),
        suite.edge.CancelJob(edge_pb2.CancelJobRequest(job_id=job_id), metadata=intruder.auth()),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED), info.value
    listed = await suite.edge.ListSessions(edge_pb2.ListSessionsRequest(), metadata=intruder.auth())
    assert not listed.sessions
    # The owner still has everything.
    await suite.edge.GetSession(edge_pb2.GetSessionRequest(session_id=session_id), metadata=owner.auth())
    await suite.edge.GetJob(edge_pb2.GetJobRequest(job_id=job_id), metadata=owner.auth())


async def test_short_of_cpu_paid_chats_wait_for_a_slot_and_enterprise_ones_do_not(suite: Suite) -> None:
    tenant = await new_tenant(suite)
    app: Any = suite.running["edge"].app
    await app.governor.stop()  # hold the allowance where the test puts it
    lane = app.chat_lane
    await lane.set_allowed(lane.floor)
    held = [await lane.acquire() for _ in range(lane.allowed)]  # every paced slot busy
    try:
        request = edge_pb2.ChatRequest(messages=[user("Is the queue fair to everyone?")])
        enterprise = await suite.edge.Chat(request, metadata=tenant.auth("enterprise"), timeout=10)
        assert enterprise.message.content
        with pytest.raises(grpc.aio.AioRpcError) as waited:
            await suite.edge.Chat(request, metadata=tenant.auth("paid"), timeout=0.5)
        assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The client gave up first; the edge notices the cancellation and leaves the line soon after.
        await eventually(lambda: lane.waiting == 0, what="the abandoned chat left the lane")
        paid = asyncio.ensure_future(suite.edge.Chat(request, metadata=tenant.auth("paid"), timeout=60))
        await eventually(lambda: lane.waiting == 1, what="the paid chat waiting for a slot")
        assert not paid.done()
        await lane.release()  # a slot frees up: the waiting paid chat goes ahead
        held.pop()
        assert (await paid).message.content
    finally:
        for _ in held:
            await lane.release()
        await lane.set_allowed(lane.ceiling)
        app.governor.start()


async def test_short_of_cpu_free_chats_give_way_to_paid_ones_and_are_refused_with_a_retry_hint(
    suite: Suite,
) -> None:
    tenant = await new_tenant(suite)
    app: Any = suite.running["edge"].app
    await app.governor.stop()  # hold the allowances where the test puts them
    free_lane = app.free_lane
    await free_lane.set_allowed(free_lane.floor)
    held = [await free_lane.acquire() for _ in range(free_lane.allowed)]  # every free slot busy
    try:
        request = edge_pb2.ChatRequest(messages=[user("Who goes first when the CPU runs out?")])
        # Paid chats have a lane of their own: the free tier's being full does not hold them up.
        paid = await suite.edge.Chat(request, metadata=tenant.auth("paid"), timeout=30)
        assert paid.message.content
        # A free chat waits at most BALLAST_EDGE_FREE_CHAT_MAX_WAIT for a slot, however long its
        # deadline, then is told to come back (rather than failing on its deadline).
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await suite.edge.Chat(request, metadata=tenant.auth("free"), timeout=60)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "higher-priority" in (refused.value.details() or "")
        status = rpc_status.from_call(refused.value)
        assert status is not None
        retry = error_details_pb2.RetryInfo()
        assert any(detail.Unpack(retry) for detail in status.details)
        assert retry.retry_delay.seconds >= 1
        assert free_lane.waiting == 0
    finally:
        for _ in held:
            await free_lane.release()
        await free_lane.set_allowed(free_lane.ceiling)
        app.governor.start()
