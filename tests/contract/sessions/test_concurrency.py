"""Many appenders on one session, and a PostgreSQL restart in the middle of them.

Each appender behaves as a well-written client: on ABORTED it takes the current version
and retries; on UNAVAILABLE (or a deadline) it retries with the same idempotency key.
Afterwards every acknowledged turn is in the history exactly once, in order, and the
acknowledged versions strictly increase along the history.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import grpc
import pytest
from ballast.sessions.v1 import sessions_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.contract.sessions.helpers import assistant_turn, caller, user_turn
from tests.support.backends import private_postgres
from tests.support.waiting import eventually

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class Ack:
    version: int
    seqs: list[int]
    contents: list[str]
    replayed: bool


def _current_version(exc: grpc.aio.AioRpcError) -> int:
    status = rpc_status.from_call(exc)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return int(info.metadata["current_version"])


async def _appender(
    suite: Suite,
    who: int,
    appends: int,
    acks: list[Ack],
    stats: dict[str, int],
    *,
    pause: float = 0.0,
    at_head: bool | None = None,
) -> None:
    stub = suite.sessions
    rng = random.Random(who)
    # By default half append at the head, half with an expected version.
    head = bool(who % 2) if at_head is None else at_head
    version = -1 if head else 0
    for n in range(appends):
        key = f"appender-{who}-{n}"
        contents = [f"q {who}.{n}", f"a {who}.{n}"]
        request = sessions_pb2.AppendTurnsRequest(
            caller=caller(),
            session_id="s1",
            idempotency_key=key,
            turns=[user_turn(contents[0]), assistant_turn(contents[1], input_tokens=10, output_tokens=2)],
        )
        for _attempt in range(500):
            request.expected_version = -1 if head else version
            try:
                reply = await stub.AppendTurns(request, timeout=5)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.ABORTED:
                    stats["aborted"] += 1
                    version = _current_version(exc)
                elif exc.code() in RETRYABLE:
                    stats["unavailable"] += 1
                    await asyncio.sleep(0.05)
                else:
                    raise
                await asyncio.sleep(rng.random() * 0.005)
                continue
            acks.append(Ack(reply.session.version, [t.seq for t in reply.turns], contents, reply.replayed))
            version = reply.session.version
            break
        else:
            raise AssertionError(f"appender {who} gave up on append {n}")
        await asyncio.sleep(pause)


async def _all_turns(suite: Suite) -> list[sessions_pb2.Turn]:
    turns: list[sessions_pb2.Turn] = []
    token = ""
    while True:
        page = await suite.sessions.ListTurns(
            sessions_pb2.ListTurnsRequest(caller=caller(), session_id="s1", page_size=500, page_token=token),
            timeout=10,
        )
        turns += page.turns
        token = page.next_page_token
        if not token:
            return turns


def _check(acks: list[Ack], turns: list[sessions_pb2.Turn], appenders: int, appends: int) -> None:
    assert len(acks) == appenders * appends
    # Exactly once, in order: the history is the acknowledged appends, in version order.
    acks.sort(key=lambda a: a.version)
    versions = [a.version for a in acks]
    assert versions == list(range(1, len(acks) + 1)), "versions strictly increase, one per append"
    assert [t.seq for t in turns] == list(range(1, len(turns) + 1))
    assert [t.message.content for t in turns] == [c for a in acks for c in a.contents]
    for ack in acks:
        assert [turns[s - 1].message.content for s in ack.seqs] == ack.contents


async def test_fifty_concurrent_appenders_on_postgres(suite_factory: SuiteFactory, postgres_dsn: str) -> None:
    suite = await suite_factory(
        ["sessions"], {"BALLAST_SESSIONS_STORE": postgres_dsn, "BALLAST_SESSIONS_COMPACTION": "false"}
    )
    await suite.sessions.CreateSession(sessions_pb2.CreateSessionRequest(caller=caller(), session_id="s1"))
    acks: list[Ack] = []
    stats = {"aborted": 0, "unavailable": 0}
    await asyncio.wait_for(asyncio.gather(*(_appender(suite, i, 3, acks, stats) for i in range(50))), 60)
    _check(acks, await _all_turns(suite), 50, 3)
    assert stats["aborted"] > 0, "the test must actually race"
    session = await suite.sessions.GetSession(
        sessions_pb2.GetSessionRequest(caller=caller(), session_id="s1")
    )
    counters = session.session.counters
    assert (counters.turns, counters.input_tokens, counters.output_tokens) == (300, 1500, 300)


@pytest.mark.parametrize("mode", ["immediate", "fast"])
async def test_postgres_restart_mid_run_loses_nothing_and_recovers(
    suite_factory: SuiteFactory, mode: str
) -> None:
    """immediate is a crash (sockets just close); fast tells every client it is shutting down."""
    with private_postgres() as server:
        suite = await suite_factory(
            ["sessions"],
            {
                "BALLAST_SESSIONS_STORE": server.dsn,
                "BALLAST_SESSIONS_COMPACTION": "false",
                "BALLAST_SESSIONS_CONNECT_TIMEOUT": "500ms",
                "BALLAST_SESSIONS_COMMAND_TIMEOUT": "2s",
                "BALLAST_SESSIONS_ACQUIRE_TIMEOUT": "1s",
            },
        )
        await suite.sessions.CreateSession(
            sessions_pb2.CreateSessionRequest(caller=caller(), session_id="s1")
        )
        acks: list[Ack] = []
        stats = {"aborted": 0, "unavailable": 0}
        appenders = asyncio.gather(
            *(_appender(suite, i, 20, acks, stats, pause=0.02, at_head=True) for i in range(8))
        )
        await eventually(lambda: len(acks) >= 20, what="20 appends acknowledged", interval=0.005)
        acked_before = len(acks)
        # While appends are in flight.
        await asyncio.to_thread(server.stop, mode=mode)
        try:
            # While it is down, calls fail with UNAVAILABLE by the service's own timeouts (seconds):
            # a call left waiting on the dead database would run into this generous deadline and
            # fail DEADLINE_EXCEEDED instead, so no assertion bets on how fast the machine is.
            try:
                await suite.sessions.GetSession(
                    sessions_pb2.GetSessionRequest(caller=caller(), session_id="s1"), timeout=60
                )
                raise AssertionError("GetSession succeeded with PostgreSQL down")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            await asyncio.sleep(0.5)  # the outage lasts a while: appenders run into it
        finally:
            await asyncio.to_thread(server.start)
        await asyncio.wait_for(appenders, 60)
        assert acked_before < len(acks) and stats["unavailable"] > 0
        # Same service instance, no restart: it serves again, and nothing acknowledged is lost.
        _check(acks, await _all_turns(suite), 8, 20)
        await suite.stop()  # while its database is still up
