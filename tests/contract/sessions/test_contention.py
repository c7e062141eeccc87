"""Versioned appends on a contended session: clear retry hints and fair turns.

Writers follow the client behaviour the README documents: on ABORTED, wait RetryInfo's delay
and retry with ErrorInfo's current_version. The queue's waits are set long here so that the
assertions (attempt counts) do not depend on how fast the machine is.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from ballast.sessions.v1 import sessions_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.contract.sessions.helpers import caller, user_turn

PATIENT = {"BALLAST_SESSIONS_CONFLICT_QUEUE_WAIT": "120s", "BALLAST_SESSIONS_CONFLICT_TURN_TIMEOUT": "120s"}


def _hint(exc: grpc.aio.AioRpcError) -> tuple[int | None, float]:
    """(current_version, retry delay in seconds) from an ABORTED status's details."""
    status = rpc_status.from_call(exc)
    assert status is not None
    current: int | None = None
    delay: float | None = None
    for detail in status.details:
        info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            current = int(info.metadata["current_version"])
        elif detail.Unpack(retry):
            delay = retry.retry_delay.ToNanoseconds() / 1e9
    assert delay is not None, "ABORTED carries google.rpc.RetryInfo"
    return current, delay


async def _start(suite_factory: SuiteFactory, store_url: str, **extra: str) -> Suite:
    suite = await suite_factory(
        ["sessions"],
        {"BALLAST_SESSIONS_STORE": store_url, "BALLAST_SESSIONS_COMPACTION": "false", **extra},
    )
    await suite.sessions.CreateSession(sessions_pb2.CreateSessionRequest(caller=caller(), session_id="s1"))
    return suite


def _append(version: int, text: str, key: str = "") -> sessions_pb2.AppendTurnsRequest:
    return sessions_pb2.AppendTurnsRequest(
        caller=caller(),
        session_id="s1",
        expected_version=version,
        idempotency_key=key,
        turns=[user_turn(text)],
    )


async def _append_as_documented(
    suite: Suite, request: sessions_pb2.AppendTurnsRequest
) -> tuple[sessions_pb2.AppendTurnsResponse, int]:
    """The documented client loop (services/sessions/README.md): on ABORTED, wait the hint's
    delay and retry at its version with the same key. The reply, and the calls it took."""
    for attempt in range(1, 1000):
        try:
            return await suite.sessions.AppendTurns(request), attempt
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.ABORTED, exc
            current, delay = _hint(exc)
            assert current is not None and current >= request.expected_version
            request.expected_version = current
            await asyncio.sleep(delay)
    raise AssertionError(f"{request.idempotency_key}: no turn in 999 calls")


@pytest.fixture
async def patient(suite_factory: SuiteFactory, store_url: str) -> AsyncIterator[Suite]:
    yield await _start(suite_factory, store_url, **PATIENT)


@pytest.mark.parametrize("queue", ["on", "off"])
async def test_aborted_carries_the_current_version_and_a_retry_delay(
    suite_factory: SuiteFactory, store_url: str, queue: str
) -> None:
    extra = {} if queue == "on" else {"BALLAST_SESSIONS_CONFLICT_QUEUE_MAX": "0"}
    suite = await _start(suite_factory, store_url, **extra)
    await suite.sessions.AppendTurns(_append(0, "first"))
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await suite.sessions.AppendTurns(_append(0, "late", "k-late"))
    assert stale.value.code() == grpc.StatusCode.ABORTED
    assert "version 1" in (stale.value.details() or "")
    current, delay = _hint(stale.value)
    assert current == 1 and 0 <= delay < 1
    # Retrying as told succeeds, with the same key even though the re-read changed the turn.
    reply = await suite.sessions.AppendTurns(_append(current, "late, having read 'first'", "k-late"))
    assert reply.session.version == 2 and not reply.replayed


async def test_contended_writers_take_turns_and_none_retries_more_than_once(patient: Suite) -> None:
    writers, appends = 20, 5
    attempts: list[int] = []

    async def writer(who: int) -> None:
        version = 0
        for n in range(appends):
            reply, attempt = await _append_as_documented(
                patient, _append(version, f"w{who}.{n}", f"w{who}.{n}")
            )
            version = reply.session.version
            attempts.append(attempt)

    await asyncio.wait_for(asyncio.gather(*(writer(i) for i in range(writers))), 300)
    # Each append needed at most one ABORTED: the service kept every writer's place in line.
    assert len(attempts) == writers * appends and max(attempts) <= 2
    assert attempts.count(2) > 0, "the test must actually race"
    session = await patient.sessions.GetSession(
        sessions_pb2.GetSessionRequest(caller=caller(), session_id="s1")
    )
    assert session.session.version == writers * appends


async def test_a_writer_that_does_not_come_back_does_not_block_the_session(
    suite_factory: SuiteFactory, store_url: str
) -> None:
    suite = await _start(
        suite_factory,
        store_url,
        BALLAST_SESSIONS_CONFLICT_TURN_TIMEOUT="10ms",
        BALLAST_SESSIONS_CONFLICT_QUEUE_WAIT="120s",
    )
    await suite.sessions.AppendTurns(_append(0, "first"))
    # This writer is told it is its turn at version 1, and then never retries.
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await suite.sessions.AppendTurns(_append(0, "abandoned"))
    assert _hint(gone.value) == (1, 0.0)
    # Another stale writer waits behind that turn, gets its own once it lapses, and succeeds.
    with pytest.raises(grpc.aio.AioRpcError) as next_in_line:
        await asyncio.wait_for(suite.sessions.AppendTurns(_append(0, "second")), 60)
    assert _hint(next_in_line.value) == (1, 0.0)
    reply = await suite.sessions.AppendTurns(_append(1, "second"))
    assert reply.session.version == 2


async def test_head_appends_never_wait_for_versioned_writers(patient: Suite) -> None:
    await patient.sessions.AppendTurns(_append(0, "first"))
    with pytest.raises(grpc.aio.AioRpcError):
        await patient.sessions.AppendTurns(_append(0, "stale"))  # its turn is now held (120 s)
    # A head append goes straight through while that turn is held.
    reply = await asyncio.wait_for(patient.sessions.AppendTurns(_append(-1, "head")), 60)
    assert reply.session.version == 2
    # The held writer, retrying at the version it was given, was overtaken: told again, at once.
    with pytest.raises(grpc.aio.AioRpcError) as overtaken:
        await patient.sessions.AppendTurns(_append(1, "stale"))
    assert _hint(overtaken.value) == (2, 0.0)
    assert (await patient.sessions.AppendTurns(_append(2, "stale"))).session.version == 3


async def test_many_versioned_writers_each_append_exactly_once(patient: Suite) -> None:
    """The documented client loop from many clients at once: every append is acknowledged once,
    stored once, at a version no other append got, and a retry after a lost answer replays."""
    writers, appends = 25, 4
    acknowledged: dict[str, int] = {}

    async def writer(who: int) -> None:
        version, seen = 0, -1
        for n in range(appends):
            key = f"w{who}.{n}"
            reply, _ = await _append_as_documented(patient, _append(version, key, key))
            assert not reply.replayed
            version = reply.session.version
            assert version > seen, "a writer's versions only go up"
            seen = version
            acknowledged[key] = version

    await asyncio.wait_for(asyncio.gather(*(writer(i) for i in range(writers))), 300)
    assert len(acknowledged) == writers * appends
    assert sorted(acknowledged.values()) == list(range(1, writers * appends + 1))
    # The answer to one append is lost and its client retries with the same key and a stale
    # version: the original result comes back, nothing is appended again.
    again = await patient.sessions.AppendTurns(_append(0, "w3.1", "w3.1"))
    assert again.replayed and again.session.version == acknowledged["w3.1"]
    turns = await patient.sessions.ListTurns(
        sessions_pb2.ListTurnsRequest(caller=caller(), session_id="s1", page_size=500)
    )
    assert sorted(t.message.content for t in turns.turns) == sorted(acknowledged)


async def test_writers_that_ask_for_their_next_turn_append_with_one_call_each(patient: Suite) -> None:
    """The documented loop with wait_for_next_turn: after a writer's first append, every append
    goes through at the version its previous answer gave, with no ABORTED; each is stored once
    at a version no other append got."""
    writers, appends = 10, 5
    calls: dict[int, list[int]] = {who: [] for who in range(writers)}
    acknowledged: dict[str, int] = {}

    async def writer(who: int) -> None:
        version = 0
        for n in range(appends):
            key = f"w{who}.{n}"
            request = _append(version, key, key)
            request.wait_for_next_turn = n < appends - 1  # not with the last one
            reply, attempt = await _append_as_documented(patient, request)
            assert not reply.replayed
            acknowledged[key] = reply.session.version
            if request.wait_for_next_turn:
                assert reply.next_turn_version >= reply.session.version
                version = reply.next_turn_version
            else:
                assert reply.next_turn_version == 0
            calls[who].append(attempt)

    await asyncio.wait_for(asyncio.gather(*(writer(i) for i in range(writers))), 300)
    # A writer's first append may need an ABORTED to learn the version; none after it does.
    assert all(attempts[1:] == [1] * (appends - 1) for attempts in calls.values()), calls
    assert sorted(acknowledged.values()) == list(range(1, writers * appends + 1))
    turns = await patient.sessions.ListTurns(
        sessions_pb2.ListTurnsRequest(caller=caller(), session_id="s1", page_size=500)
    )
    assert sorted(t.message.content for t in turns.turns) == sorted(acknowledged)


async def test_a_head_append_asking_for_a_next_turn_is_answered_at_once_without_one(patient: Suite) -> None:
    request = _append(-1, "head", "k-head")
    request.wait_for_next_turn = True
    reply = await patient.sessions.AppendTurns(request)
    assert reply.session.version == 1 and reply.next_turn_version == 0
