"""A Redis outage: calls fail UNAVAILABLE (never INTERNAL, never a wrong hit), and replicas
resynchronise their indexes when Redis is back."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.support.backends import private_redis
from tests.unit.cache.helpers import lookup, store


async def _eventually_hit(suite: Suite, question: str, attempts: int = 150) -> bool:
    for _ in range(attempts):
        try:
            if (await suite.cache.Lookup(lookup(question, threshold=0.9))).hit:
                return True
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)
    return False


async def test_outage_is_unavailable_and_replicas_resync(suite_factory: SuiteFactory) -> None:
    with private_redis(durable=True) as server:
        env = {
            "BALLAST_CACHE_STORE": server.url,
            "BALLAST_CACHE_FILE": "/none.yaml",
            "BALLAST_CACHE_SYNC_BLOCK": "200ms",
        }
        a = await suite_factory(["cache"], env)
        b = await suite_factory(["cache"], env)
        assert (await a.cache.Store(store("How do I reset my password?", "Reset link."))).stored
        assert await _eventually_hit(b, "How do I reset my password please?")

        server.stop(kill=True)
        for call in (
            a.cache.Lookup(lookup("How do I reset my password?")),
            a.cache.Store(store("Where is my order?", "In transit.")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        server.start()
        stored = False
        for _ in range(100):
            try:
                stored = (await a.cache.Store(store("Where is my order?", "In transit."))).stored
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
        assert stored
        assert await _eventually_hit(b, "Where is my order now?")
        assert await _eventually_hit(b, "How do I reset my password please?")
