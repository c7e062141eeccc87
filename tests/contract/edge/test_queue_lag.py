"""The Redis queue keeps the consumer group's lag countable, which KEDA scales the workers on:
jobs that finish out of order (as concurrent workers finish them) must not make Redis report the
lag as unknown, and finished entries must still leave the stream."""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from services.edge.store import SUCCEEDED, JobRecord
from services.edge.store.redis import GROUP, RedisEdgeStore, stream_key
from services.kit.redisconn import split_key_prefix


def _job(job_id: str) -> JobRecord:
    # A tenant each: fair admission keeps one waiting entry per tenant in the stream.
    return JobRecord(
        job_id=job_id,
        tenant_id=f"t-{job_id}",
        user_id="u",
        priority="normal",
        request=b"r",
        caller=b"c",
        created_at=time.time(),
    )


async def _lag(client: aioredis.Redis, stream: str) -> Any:
    groups: Any = await client.xinfo_groups(stream)
    return next(g["lag"] for g in groups if g["name"] in (GROUP, GROUP.encode()))


async def test_lag_stays_countable_when_jobs_finish_out_of_order(redis_url: str) -> None:
    store = RedisEdgeStore(redis_url)
    await store.start()
    clean, prefix = split_key_prefix(redis_url)
    client = aioredis.Redis.from_url(clean)
    stream = stream_key("normal", prefix)
    try:
        for index in range(6):
            await store.submit(_job(f"j{index}"), "")
        assert await _lag(client, stream) == 6
        first, second, third = [await store.claim("w", block=1.0) for _ in range(3)]
        assert first and second and third
        # The newest claim finishes first, then the middle one: the oldest is still running.
        for claim in (third, second):
            claim.job.state = SUCCEEDED
            assert await store.finish(claim, claim.job)
        assert await _lag(client, stream) == 3  # not nil: three jobs no worker has read
        assert (await store.depth())["normal"] == 3
        # The running job is still in the stream (its start time is the oldest unfinished job's).
        assert await client.xlen(stream) == 6 and await store.oldest_enqueued_at() is not None
        first.job.state = SUCCEEDED
        assert await store.finish(first, first.job)
        # Everything finished leaves the stream from its head; what waits stays.
        assert await client.xlen(stream) == 3
        assert await _lag(client, stream) == 3
        rest = [await store.claim("w", block=1.0) for _ in range(3)]
        for later in reversed(rest):
            assert later is not None
            later.job.state = SUCCEEDED
            assert await store.finish(later, later.job)
            assert await _lag(client, stream) == 0
        assert await client.xlen(stream) == 0
        assert (await store.depth())["normal"] == 0 and await store.oldest_enqueued_at() is None
    finally:
        await client.aclose()
        await store.close()
