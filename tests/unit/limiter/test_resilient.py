"""The local fail mode against a real Redis that goes away: the share, what was left, write-back."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from services.limiter.store.base import Kind, LimitOp
from services.limiter.store.redis import RedisStore
from services.limiter.store.resilient import ResilientStore
from tests.support.backends import PrivateRedis, private_redis

HOUR_MS = 3_600_000


@pytest.fixture
def server() -> Iterator[PrivateRedis]:
    with private_redis(durable=True) as s:
        yield s


def window(limit: int) -> LimitOp:
    return LimitOp(Kind.WINDOW, "{t:a}:u:x:rq", limit, 1, HOUR_MS)


def store(url: str, *, share: float = 0.0, replicas: int = 1) -> ResilientStore:
    # A refused connection fails at once; the generous timeout only guards a stuck call.
    return ResilientStore(
        RedisStore(url, timeout=30),
        mode="local",
        timeout=30,
        retry_interval=0,
        replicas=replicas,
        share=share,
    )


async def test_a_replica_alone_admits_its_share_of_what_was_left_then_writes_it_back(
    server: PrivateRedis,
) -> None:
    s = store(server.url, share=0.25)
    try:
        for _ in range(10):
            assert (await s.decide([window(40)])).admitted  # 30 left, as Redis says
        await asyncio.to_thread(server.stop, kill=True)
        local = [await s.decide([window(40)]) for _ in range(12)]
        assert all(o.degraded for o in local)
        # its share of the limit is 10, of what was left 7: the smaller one holds
        assert sum(o.admitted for o in local) == 7
        assert s.pending_charges == 7
        await asyncio.to_thread(server.start)
        back = await s.decide([window(40)])
        assert not back.degraded and back.admitted and s.pending_charges == 0
        assert back.results[0].used == 18  # 10 before, 7 written back, this one
    finally:
        await s.close()


async def test_the_share_defaults_to_one_over_the_replicas_and_a_spent_limit_stays_spent(
    server: PrivateRedis,
) -> None:
    s = store(server.url, replicas=4)
    try:
        assert (await s.decide([window(2)])).admitted
        assert (await s.decide([window(2)])).admitted
        assert not (await s.decide([window(2)])).admitted  # spent, and this replica saw it
        fresh = LimitOp(Kind.WINDOW, "{t:a}:u:y:rq", 20, 1, HOUR_MS)
        await asyncio.to_thread(server.stop, kill=True)
        assert not (await s.decide([window(2)])).admitted
        assert sum([(await s.decide([fresh])).admitted for _ in range(8)]) == 5  # never seen: 20 / 4
    finally:
        await s.close()
