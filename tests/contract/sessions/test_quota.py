"""Sessions per user are capped (BALLAST_SESSIONS_MAX_PER_USER), on the memory store and PostgreSQL."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from ballast.sessions.v1 import sessions_pb2
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.contract.sessions.helpers import caller


async def _start(suite_factory: SuiteFactory, store_url: str, cap: int) -> Suite:
    return await suite_factory(
        ["sessions"],
        {
            "BALLAST_SESSIONS_STORE": store_url,
            "BALLAST_SESSIONS_COMPACTION": "false",
            "BALLAST_SESSIONS_MAX_PER_USER": str(cap),
        },
    )


async def _create(suite: Suite, session_id: str, tenant: str = "t1", user: str = "u1") -> None:
    await suite.sessions.CreateSession(
        sessions_pb2.CreateSessionRequest(caller=caller(tenant, user), session_id=session_id)
    )


async def test_a_user_at_the_cap_gets_resource_exhausted_naming_it(
    suite_factory: SuiteFactory, store_url: str
) -> None:
    suite = await _start(suite_factory, store_url, 3)
    for n in range(3):
        await _create(suite, f"s{n}")
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await _create(suite, "s3")
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    message = full.value.details() or ""
    assert "BALLAST_SESSIONS_MAX_PER_USER" in message and "3" in message
    status = rpc_status.from_call(full.value)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) and info.reason == "SESSIONS_PER_USER" for d in status.details)
    # Nothing was stored by the refused call, and an existing id is still ALREADY_EXISTS.
    listed = await suite.sessions.ListSessions(sessions_pb2.ListSessionsRequest(caller=caller()))
    assert sorted(s.session_id for s in listed.sessions) == ["s0", "s1", "s2"]
    with pytest.raises(grpc.aio.AioRpcError) as taken:
        await _create(suite, "s0")
    assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # The cap is per (tenant, user): another user, or the same user id in another tenant, is free.
    await _create(suite, "s3", user="u2")
    await _create(suite, "s3", tenant="t2")
    # Deleting one frees a slot.
    await suite.sessions.DeleteSession(sessions_pb2.DeleteSessionRequest(caller=caller(), session_id="s0"))
    await _create(suite, "s3")


async def test_concurrent_creates_never_pass_the_cap(suite_factory: SuiteFactory, store_url: str) -> None:
    suite = await _start(suite_factory, store_url, 4)
    results = await asyncio.gather(*(_create(suite, f"c{n}") for n in range(20)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(results) - len(refused) == 4
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    listed = await suite.sessions.ListSessions(sessions_pb2.ListSessionsRequest(caller=caller()))
    assert len(listed.sessions) == 4


async def test_zero_removes_the_cap(suite_factory: SuiteFactory, store_url: str) -> None:
    suite = await _start(suite_factory, store_url, 0)
    for n in range(30):
        await _create(suite, f"s{n}")


async def test_expired_sessions_do_not_count(suite_factory: SuiteFactory, store_url: str) -> None:
    suite = await _start(suite_factory, store_url, 1)
    await suite.sessions.CreateSession(
        sessions_pb2.CreateSessionRequest(caller=caller(), session_id="brief", ttl=Duration(nanos=1_000_000))
    )
    # Once that one has expired (1 ms; polled with a generous deadline), the slot is free again.
    deadline = time.monotonic() + 60
    while True:
        try:
            await _create(suite, "next")
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "the expired session still counted"
            await asyncio.sleep(0.01)
