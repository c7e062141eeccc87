"""ChatPipeline.prepare: the Check in the chat's task, the context or lookup beside it, and what
happens to a reservation and to a failure beside when either side fails."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2
from ballast.limiter.v1 import limiter_pb2

from services.edge.downstream import Deadline
from services.edge.edge import ChatPipeline
from services.kit.errors import NotFound, Unavailable

CALLER = common_pb2.Caller(tenant_id="t", user_id="u", tier="paid")


def _pipeline(check: Any, beside: Any) -> tuple[ChatPipeline, list[str]]:
    """A pipeline whose downstream steps are the given coroutine functions."""
    pipeline = ChatPipeline.__new__(ChatPipeline)
    released: list[str] = []

    async def release(caller: Any, reservation_id: str, deadline: Any) -> None:
        released.append(reservation_id)

    pipeline._system = lambda request: []  # type: ignore[method-assign]
    pipeline._check = check  # type: ignore[method-assign]
    pipeline._context = beside  # type: ignore[method-assign]
    pipeline._lookup = beside  # type: ignore[method-assign]
    pipeline._release = release  # type: ignore[method-assign]
    return pipeline, released


def _chat(session_id: str = "") -> edge_pb2.ChatRequest:
    message = common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hi")
    return edge_pb2.ChatRequest(session_id=session_id, messages=[message])


@pytest.mark.parametrize("session_id", ["", "s1"])
async def test_a_failure_beside_a_successful_check_releases_its_reservation(session_id: str) -> None:
    failing = asyncio.Event()

    async def check(*_: Any) -> limiter_pb2.CheckResponse:
        await failing.wait()  # the failure beside comes first
        return limiter_pb2.CheckResponse(reservation_id="r1")

    async def beside(*_: Any, **__: Any) -> None:
        failing.set()
        raise NotFound("no such session")

    pipeline, released = _pipeline(check, beside)
    with pytest.raises(NotFound):
        await pipeline.prepare(CALLER, _chat(session_id), "req1", Deadline(None))
    assert released == ["r1"]


async def test_a_failed_check_cancels_what_runs_beside_it_and_releases_nothing() -> None:
    cancelled, started = asyncio.Event(), asyncio.Event()

    async def check(*_: Any) -> None:
        await started.wait()  # what runs beside is under way when the Check fails
        raise Unavailable("limiter down")

    async def beside(*_: Any, **__: Any) -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # until cancelled
        except asyncio.CancelledError:
            cancelled.set()
            raise

    pipeline, released = _pipeline(check, beside)
    with pytest.raises(Unavailable):
        await pipeline.prepare(CALLER, _chat("s1"), "req1", Deadline(None))
    await asyncio.wait_for(cancelled.wait(), 30)
    assert released == []


async def test_what_ran_beside_the_check_becomes_the_context_or_the_cached_answer() -> None:
    async def check(*_: Any) -> limiter_pb2.CheckResponse:
        return limiter_pb2.CheckResponse(reservation_id="r1")

    async def beside(*_: Any, **__: Any) -> None:
        return None

    pipeline, released = _pipeline(check, beside)
    prepared = await pipeline.prepare(CALLER, _chat(), "req1", Deadline(None))
    assert prepared.reservation_id == "r1" and prepared.cached is None
    assert released == []
