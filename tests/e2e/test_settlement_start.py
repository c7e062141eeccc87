"""A settlement starts when it is asked for, not when its caller first awaits it: a chat cancelled
between its answer and that await (the client gone while the answer's jobs are gathered) must
still be charged. Against a real limiter."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ballast.common.v1 import common_pb2
from ballast.limiter.v1 import limiter_pb2

from services.edge.app import EdgeApp
from tests.conftest import SuiteFactory
from tests.e2e.conftest import write_test_config
from tests.support.waiting import eventually

CALLER = common_pb2.Caller(tenant_id="settle-start", user_id="u1", tier="paid")


async def test_a_settlement_never_awaited_is_still_charged(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    suite = await suite_factory(["limiter", "edge"], write_test_config(tmp_path))
    edge = suite.running["edge"].app
    assert isinstance(edge, EdgeApp)
    check = await suite.limiter.Check(
        limiter_pb2.CheckRequest(caller=CALLER, requests=1, reserve_tokens=500, request_id="settle-start-1")
    )
    assert check.reservation_id

    async def cancelled_caller() -> None:
        # Asks for the settlement, then is cancelled before it ever awaits it.
        edge.settler.settle(
            limiter_pb2.CommitRequest(reservation_id=check.reservation_id, caller=CALLER, actual_tokens=321)
        )
        await asyncio.Event().wait()

    caller = asyncio.ensure_future(cancelled_caller())
    await asyncio.sleep(0)  # let it run up to its wait
    caller.cancel()

    async def charged_in_full() -> bool:
        usage = await suite.limiter.GetUsage(limiter_pb2.GetUsageRequest(caller=CALLER))
        return usage.tokens_today == 321

    await eventually(charged_in_full, what="the 321 tokens charged")
