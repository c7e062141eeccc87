"""An answer the model already gave is kept when its caller hangs up while the edge records it:
the session gets the turn (a retry with the same idempotency key gets this answer back) and the
cache the answer (the next caller who asks the same does not pay the model again). Against real
services."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
from pathlib import Path

from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2
from ballast.router.v1 import router_pb2
from ballast.sessions.v1 import sessions_pb2

from services.edge.app import EdgeApp
from services.edge.edge import Prepared
from tests.conftest import SuiteFactory
from tests.e2e.conftest import write_test_config

AUTH = (("authorization", "Bearer bk_demo_paid"),)
# The caller that key authenticates (config/edge_keys.yaml).
CALLER = common_pb2.Caller(tenant_id="demo", user_id="bob", tier="paid")


def _answer(text: str) -> router_pb2.CompleteResponse:
    return router_pb2.CompleteResponse(
        message=common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content=text),
        finish_reason=common_pb2.FINISH_REASON_STOP,
        usage=common_pb2.Usage(input_tokens=12, output_tokens=5),
        model="sim-small",
        provider="sim-primary",
    )


async def _finish_then_hang_up(
    edge: EdgeApp, prepared: Prepared, answer: router_pb2.CompleteResponse
) -> None:
    finishing = asyncio.ensure_future(edge.pipeline.finish(prepared, answer, cache_hit=False))
    await asyncio.sleep(0)  # it starts the session append and the cache store, and waits for them
    finishing.cancel()  # the client is gone before they are done
    with contextlib.suppress(asyncio.CancelledError):
        await finishing


async def test_a_caller_that_hangs_up_after_the_answer_loses_neither_turn_nor_cache(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    suite = await suite_factory(
        ["router", "limiter", "cache", "sessions", "edge"], write_test_config(tmp_path)
    )
    edge = suite.running["edge"].app
    assert isinstance(edge, EdgeApp)
    question = common_pb2.ChatMessage(
        role=common_pb2.ROLE_USER, content="Which trains run to Porto on Sunday?"
    )
    session = (
        await suite.edge.CreateSession(edge_pb2.CreateSessionRequest(title="trip"), metadata=AUTH)
    ).session

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        in_session = edge_pb2.ChatRequest(
            messages=[question], session_id=session.session_id, idempotency_key="k1"
        )
        await _finish_then_hang_up(
            edge,
            Prepared("req-1", CALLER, in_session, list(in_session.messages)),
            _answer("Hourly, from 7:00."),
        )
        stateless = edge_pb2.ChatRequest(messages=[question])
        await _finish_then_hang_up(
            edge,
            Prepared("req-2", CALLER, stateless, list(stateless.messages)),
            _answer("Hourly, from 7:00."),
        )

        # What a graceful stop waits for (EdgeApp.drain): both recordings end within it.
        await edge.pipeline.drain(grace=60)
        assert edge.pipeline.unattended == 0
        page = await suite.sessions.ListTurns(
            sessions_pb2.ListTurnsRequest(caller=CALLER, session_id=session.session_id, page_size=10)
        )
        assert [t.message.content for t in page.turns] == [question.content, "Hourly, from 7:00."]

        reply = await suite.edge.Chat(edge_pb2.ChatRequest(messages=[question]), metadata=AUTH)
        assert reply.cache_hit and reply.message.content == "Hourly, from 7:00."
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)], [str(w.message) for w in caught]
