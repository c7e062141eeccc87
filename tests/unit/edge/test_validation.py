"""Bad chat input is refused at the edge with INVALID_ARGUMENT naming the field, before any downstream call."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2

from services.edge.validation import json_depth_exceeds
from services.testing import Suite, start_suite
from tests.conftest import SuiteFactory

KEY = (("authorization", "Bearer bk_demo_paid"),)
USER = common_pb2.ROLE_USER
# 5,000 levels: past Python's parser, which raised RecursionError (INTERNAL) on it.
DEEP = '{"a": ' + "[" * 5000 + "]" * 5000 + "}"


def _chat(**fields: object) -> edge_pb2.ChatRequest:
    request = edge_pb2.ChatRequest(messages=[common_pb2.ChatMessage(role=USER, content="hi")])
    for name, value in fields.items():
        if name == "messages":
            del request.messages[:]
            request.messages.extend(value)  # type: ignore[arg-type]
        elif name == "tools":
            request.tools.extend(value)  # type: ignore[arg-type]
        elif name == "params":
            request.params.CopyFrom(value)  # type: ignore[arg-type]
        elif name == "tool_choice":
            request.tool_choice.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(request, name, value)
    return request


CASES = [
    (_chat(messages=[]), "messages"),
    (_chat(messages=[common_pb2.ChatMessage(role=USER, content="")]), "messages[0].content"),
    (
        _chat(messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_UNSPECIFIED, content="x")]),
        "messages[0].role",
    ),
    (
        _chat(messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, content="x")]),
        "messages[0].tool_call_id",
    ),
    (
        _chat(
            messages=[
                common_pb2.ChatMessage(
                    role=common_pb2.ROLE_USER,
                    content="x",
                    tool_calls=[common_pb2.ToolCall(id="1", name="f", arguments_json="{}")],
                )
            ]
        ),
        "messages[0].tool_calls",
    ),
    (
        _chat(
            messages=[
                common_pb2.ChatMessage(
                    role=common_pb2.ROLE_ASSISTANT,
                    tool_calls=[common_pb2.ToolCall(id="1", name="f", arguments_json="{oops")],
                ),
                common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, tool_call_id="1", content="r"),
            ]
        ),
        "messages[0].tool_calls[0].arguments_json",
    ),
    (_chat(messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content="x")]), "messages"),
    (_chat(tools=[common_pb2.ToolDefinition(name="bad name!")]), "tools[0].name"),
    (
        _chat(tools=[common_pb2.ToolDefinition(name="f"), common_pb2.ToolDefinition(name="f")]),
        "tools[1].name",
    ),
    (
        _chat(tools=[common_pb2.ToolDefinition(name="f", parameters_json_schema="[]")]),
        "tools[0].parameters_json_schema",
    ),
    (
        _chat(tool_choice=common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_NAMED, name="nope")),
        "tool_choice.name",
    ),
    (_chat(params=common_pb2.GenerationParams(temperature=3.5)), "params.temperature"),
    (_chat(params=common_pb2.GenerationParams(top_p=0.0)), "params.top_p"),
    (_chat(params=common_pb2.GenerationParams(max_output_tokens=-1)), "params.max_output_tokens"),
    (_chat(session_id="has spaces"), "session_id"),
    (_chat(context_token_budget=-5), "context_token_budget"),
    # Added to the output reservation downstream, this overflowed the limiter's int64.
    (_chat(context_token_budget=2**63 - 1), "context_token_budget"),
    (_chat(params=common_pb2.GenerationParams(max_output_tokens=2**31 - 1)), "params.max_output_tokens"),
    (
        _chat(
            messages=[
                common_pb2.ChatMessage(
                    role=common_pb2.ROLE_ASSISTANT,
                    tool_calls=[common_pb2.ToolCall(id="c1", name="t", arguments_json=DEEP)],
                ),
                common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, tool_call_id="c1", content="ok"),
            ]
        ),
        "messages[0].tool_calls[0].arguments_json",
    ),
    (
        _chat(tools=[common_pb2.ToolDefinition(name="t", parameters_json_schema=DEEP)]),
        "tools[0].parameters_json_schema",
    ),
    (_chat(cache_namespace="a/b"), "cache_namespace"),
    (_chat(messages=[common_pb2.ChatMessage(role=USER, content="x" * 300_001)]), "messages"),
]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def big_message_edge() -> AsyncIterator[Suite]:
    """One edge for every bad-input case (each is refused before it changes anything)."""
    suite = await start_suite(["edge"], {"BALLAST_MAX_MESSAGE_BYTES": str(8 * 1024 * 1024)})
    yield suite
    await suite.stop(grace=0)  # nothing is asserted after the tests: no drain


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("request_", "field"), CASES, ids=[field for _, field in CASES])
async def test_bad_chat_input_names_the_field(
    big_message_edge: Suite, request_: edge_pb2.ChatRequest, field: str
) -> None:
    suite = big_message_edge
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.edge.Chat(request_, metadata=KEY)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert (info.value.details() or "").startswith(f"{field}:")


async def test_streaming_and_queued_chats_are_validated_too(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(["edge"])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in suite.edge.ChatStream(
            edge_pb2.ChatStreamRequest(chat=_chat(messages=[])), metadata=KEY
        ):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("chat.messages:")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.edge.SubmitChat(
            edge_pb2.SubmitChatRequest(chat=_chat(), webhook_url="ftp://x"), metadata=KEY
        )
    assert (info.value.details() or "").startswith("webhook_url:")


async def test_oversized_messages_are_refused_by_the_transport(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(["edge"], {"BALLAST_MAX_MESSAGE_BYTES": "65536"})
    big = _chat(messages=[common_pb2.ChatMessage(role=USER, content="x" * 100_000)])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.edge.Chat(big, metadata=KEY)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_json_depth_counts_brackets_outside_strings_only() -> None:
    assert not json_depth_exceeds('{"a": "[[[[[[[[", "b": "\\"[[[["}', 1)
    assert not json_depth_exceeds('{"a": [[1]]}', 3)
    assert json_depth_exceeds('{"a": [[1]]}', 2)
    assert json_depth_exceeds("[" * 5000, 64)


async def test_deep_tool_arguments_are_refused_with_the_configured_depth(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(["edge"], {"BALLAST_EDGE_MAX_JSON_DEPTH": "3"})
    for arguments, ok in (('{"a": [[1]]}', True), ('{"a": [[[1]]]}', False), (DEEP, False)):
        request = edge_pb2.BeginToolCallRequest(session_id="s1", tool_name="t", arguments_json=arguments)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await suite.edge.BeginToolCall(request, metadata=KEY)
        if ok:  # past validation: the sessions service is not running in this suite
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        else:
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (info.value.details() or "").startswith("arguments_json: nests")
            assert "3 levels" in (info.value.details() or "")


async def test_binary_metadata_that_is_not_utf8_is_not_an_internal_error(
    suite_factory: SuiteFactory, caplog: pytest.LogCaptureFixture
) -> None:
    suite = await suite_factory(["edge"])
    caplog.set_level(logging.INFO)
    junk = (("x-api-key-bin", b"\xff\xfe\x00"), ("x-trace-bin", b"\xc3\x28"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.edge.GetUsage(edge_pb2.GetUsageRequest(), metadata=junk)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.edge_admin.ListApiKeys(edge_pb2.ListApiKeysRequest(), metadata=junk)
    assert info.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    # Junk next to a valid key is ignored, wherever it comes.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.edge.GetJob(edge_pb2.GetJobRequest(job_id="job_x"), metadata=junk + KEY)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
