"""Cache replicas on one Redis, and on a Redis Cluster: each sees the others' entries, deletions
and counters."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from ballast.cache.v1 import cache_pb2

from services.cache.app import CacheApp
from services.cache.store.redis import RedisStore
from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.unit.cache.helpers import lookup, scope, store


@pytest.fixture(params=["redis", "cluster"])
def shared_url(request: pytest.FixtureRequest) -> str:
    """One Redis, or the session's three-primary Redis Cluster (`?cluster=true`)."""
    name = "redis_url" if request.param == "redis" else "redis_cluster_url"
    url: str = request.getfixturevalue(name)
    return url


async def _replica(suite_factory: SuiteFactory, redis_url: str) -> Suite:
    suite = await suite_factory(
        ["cache"], {"BALLAST_CACHE_STORE": redis_url, "BALLAST_CACHE_FILE": "/none.yaml"}
    )
    app = suite.running["cache"].app
    assert isinstance(app, CacheApp) and isinstance(app.store, RedisStore)
    await asyncio.wait_for(app.store.synced.wait(), 10)
    return suite


async def _until(
    call: Callable[[], Awaitable[cache_pb2.LookupResponse]], attempts: int = 100
) -> cache_pb2.LookupResponse:
    """Retries a lookup until it hits (the change stream is asynchronous), bounded to ~5 s."""
    reply = cache_pb2.LookupResponse()
    for _ in range(attempts):
        reply = await call()
        if reply.hit:
            return reply
        await asyncio.sleep(0.05)
    return reply


async def test_two_replicas_share_entries(suite_factory: SuiteFactory, shared_url: str) -> None:
    a = await _replica(suite_factory, shared_url)
    b = await _replica(suite_factory, shared_url)
    stored = await a.cache.Store(store("How do I reset my password?", "Use the reset link."))
    assert stored.stored
    exact = await b.cache.Lookup(lookup("How do I reset my password?"))
    assert exact.hit and exact.tier == cache_pb2.HIT_TIER_EXACT and exact.entry_id == stored.entry_id
    # The semantic tier needs B's local index, fed by the change stream.
    semantic = await _until(
        lambda: b.cache.Lookup(lookup("How do I reset my password please?", threshold=0.9))
    )
    assert semantic.hit and semantic.tier == cache_pb2.HIT_TIER_SEMANTIC
    assert semantic.answer.message.content == "Use the reset link."
    # A third replica started later replays what is already there.
    c = await _replica(suite_factory, shared_url)
    replayed = await c.cache.Lookup(lookup("How do I reset my password please?", threshold=0.9))
    assert replayed.hit and replayed.entry_id == stored.entry_id
    # A deletion on one replica is seen by the others.
    deleted = await b.cache.Delete(cache_pb2.DeleteRequest(scope=scope(), entry_id=stored.entry_id))
    assert deleted.deleted == 1
    for replica in (a, b, c):
        assert not (
            await replica.cache.Lookup(lookup("How do I reset my password please?", threshold=0.9))
        ).hit
        assert not (await replica.cache.Lookup(lookup("How do I reset my password?"))).hit
    stats = (await c.cache.GetStats(cache_pb2.GetStatsRequest(scope=scope()))).namespaces[0]
    assert stats.exact_hits == 1 and stats.semantic_hits >= 2 and stats.entries == 0


async def test_tenant_isolation_on_shared_redis(suite_factory: SuiteFactory, shared_url: str) -> None:
    a = await _replica(suite_factory, shared_url)
    b = await _replica(suite_factory, shared_url)
    await a.cache.Store(store("What is our refund policy?", "Tenant one's secret policy.", tenant="one"))
    assert (await _until(lambda: b.cache.Lookup(lookup("What is our refund policy?", tenant="one")))).hit
    for replica in (a, b):
        for semantic in (True, False):
            reply = await replica.cache.Lookup(
                lookup("What is our refund policy?", tenant="two", semantic=semantic, threshold=0.0001)
            )
            assert not reply.hit
    assert (
        await b.cache.Delete(cache_pb2.DeleteRequest(scope=scope("two"), all_in_namespace=True))
    ).deleted == 0
