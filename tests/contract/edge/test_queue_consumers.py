"""The Redis queue's consumer group does not collect consumers: a worker that stops cleanly hands
back what it still holds and removes its consumer, and live workers remove the consumers of
workers that died once those hold nothing and have been idle long enough. Shared Redis, streams
under this test's own key prefix."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.edge.store import QUEUED, SUCCEEDED, JobRecord
from services.edge.store.base import PRIORITY_ORDER
from services.edge.store.redis import GROUP, RedisEdgeStore, stream_key, tally_key
from services.kit.redisconn import split_key_prefix


def _job(job_id: str) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        tenant_id=f"t-{job_id}",
        user_id="u",
        priority="normal",
        request=b"r",
        caller=b"c",
        created_at=time.time(),
    )


@pytest.fixture
async def queue(redis_url: str) -> AsyncIterator[tuple[RedisEdgeStore, aioredis.Redis, str]]:
    store = RedisEdgeStore(redis_url)
    await store.start()
    clean, prefix = split_key_prefix(redis_url)
    client = aioredis.Redis.from_url(clean)
    yield store, client, prefix
    await client.aclose()
    await store.close()


async def _consumers(client: aioredis.Redis, prefix: str) -> dict[str, int]:
    """Consumer -> jobs it holds, over every priority's job stream."""
    found: dict[str, int] = {}
    for priority in PRIORITY_ORDER:
        infos: Any = await client.xinfo_consumers(stream_key(priority, prefix), GROUP)
        for info in infos:
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            found[name] = found.get(name, 0) + int(info["pending"])
    return found


async def _lag(client: aioredis.Redis, stream: str) -> int:
    groups: Any = await client.xinfo_groups(stream)
    return int(next(g["lag"] for g in groups))


async def test_a_clean_stop_hands_back_held_jobs_and_removes_the_consumer(
    queue: tuple[RedisEdgeStore, aioredis.Redis, str],
) -> None:
    store, client, prefix = queue
    for name in ("a", "b", "c"):
        await store.submit(_job(name), "")
    done, cut = await store.claim("stopping", block=1.0), await store.claim("stopping", block=1.0)
    assert done is not None and cut is not None
    done.job.state = SUCCEEDED
    assert await store.finish(done, done.job)
    assert await _consumers(client, prefix) == {"stopping": 1}
    assert await _lag(client, tally_key("normal", prefix)) == 1

    # The job the drain cut goes back in line at once, ahead of nothing it should not pass.
    assert await store.release("stopping") == 1
    assert "stopping" not in await _consumers(client, prefix)
    record = await store.get_job(cut.job.job_id)
    assert record is not None and record.state == QUEUED
    assert await _lag(client, tally_key("normal", prefix)) == 2
    claimed = {c.job.job_id for c in [await store.claim("next", block=1.0) for _ in range(2)] if c}
    assert claimed == {cut.job.job_id, "c"}
    assert (await store.get_job(cut.job.job_id)).attempts == 2  # type: ignore[union-attr]


async def test_a_clean_stop_holding_nothing_just_removes_the_consumer(
    queue: tuple[RedisEdgeStore, aioredis.Redis, str],
) -> None:
    store, client, prefix = queue
    # A worker whose jobs all finished: its consumer stays in the group, holding nothing.
    await store.submit(_job("j"), "")
    claim = await store.claim("idle-worker", block=1.0)
    assert claim is not None
    claim.job.state = SUCCEEDED
    assert await store.finish(claim, claim.job)
    assert await _consumers(client, prefix) == {"idle-worker": 0}
    assert await store.release("idle-worker") == 0
    assert await _consumers(client, prefix) == {}
    # A second release (a retried shutdown) finds nothing to do.
    assert await store.release("idle-worker") == 0


async def test_live_workers_reap_dead_consumers_only_once_they_hold_nothing_and_idled(
    queue: tuple[RedisEdgeStore, aioredis.Redis, str],
) -> None:
    store, client, prefix = queue
    await store.submit(_job("j"), "")
    dead = await store.claim("dead", block=1.0)
    assert dead is not None
    assert await store.claim("live", block=0.05) is None
    # Holding a job: never removed, however long the bound (its pending entries would be lost).
    assert await store.reap("live", idle=0.0) == 0
    assert (await _consumers(client, prefix))["dead"] == 1
    # The live worker reclaims the job; the dead consumer holds nothing now, but has not been
    # idle for the bound yet.
    assert await store.reclaim("live", min_idle=0.0) == 1
    assert (await _consumers(client, prefix))["dead"] == 0
    assert await store.reap("live", idle=3600.0) == 0
    assert "dead" in await _consumers(client, prefix)
    # Past the bound it goes; the reaping worker keeps its own consumer.
    assert await store.reap("live", idle=0.0) == 1
    consumers = await _consumers(client, prefix)
    assert "dead" not in consumers and "live" in consumers
    # The job is still there for the live worker.
    again = await store.claim("live", block=1.0)
    assert again is not None and again.job.job_id == "j"
