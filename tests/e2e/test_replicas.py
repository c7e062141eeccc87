"""Replicas: the edge spreads calls over several replicas of a service and rides out losing one."""

from __future__ import annotations

from pathlib import Path

from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2
from ballast.router.v1 import router_pb2

from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.support.suite_config import write_test_config

KEY = (("authorization", "Bearer bk_demo_enterprise"),)


async def _served(router: Suite) -> int:
    status = await router.router.GetProviderStatus(router_pb2.GetProviderStatusRequest())
    return sum(p.requests for p in status.providers)


async def test_calls_are_balanced_over_replicas_and_survive_losing_one(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    environ = write_test_config(tmp_path)
    first, second = await suite_factory(["router"], environ), await suite_factory(["router"], environ)
    others = await suite_factory(["limiter", "cache", "sessions"], environ)
    edge = await suite_factory(
        ["edge"],
        {
            **environ,
            **{f"BALLAST_{n.upper()}_ADDR": others.address(n) for n in others.running},
            "BALLAST_ROUTER_ADDR": f"{first.address('router')},{second.address('router')}",
        },
    )

    async def chat(index: int) -> edge_pb2.ChatResponse:
        message = common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=f"replica question {index}")
        return await edge.edge.Chat(
            edge_pb2.ChatRequest(messages=[message], cache_mode=edge_pb2.CACHE_MODE_BYPASS),
            metadata=KEY,
            timeout=10,
        )

    for index in range(20):
        await chat(index)
    assert await _served(first) >= 5 and await _served(second) >= 5
    await first.stop()
    answers = [await chat(100 + index) for index in range(10)]
    assert all(answer.message.content for answer in answers)
