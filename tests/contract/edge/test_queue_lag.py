"""The Redis queue keeps the consumer group's lag countable, which KEDA scales the workers on:
jobs that finish out of order (as concurrent workers finish them) must not make Redis report the
lag as unknown, and finished entries must still leave the stream. The tally stream's lag counts
jobs waiting, whatever fair admission keeps in the job stream (one entry per tenant)."""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from services.edge.store import SUCCEEDED, JobRecord
from services.edge.store.redis import GROUP, RedisEdgeStore, stream_key, tally_key
from services.kit.redisconn import split_key_prefix


def _job(job_id: str, tenant: str = "") -> JobRecord:
    # A tenant each unless told: fair admission keeps one waiting entry per tenant in the stream.
    return JobRecord(
        job_id=job_id,
        tenant_id=tenant or f"t-{job_id}",
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


async def test_the_tally_lag_counts_jobs_waiting_not_tenants(redis_url: str) -> None:
    store = RedisEdgeStore(redis_url)
    await store.start()
    clean, prefix = split_key_prefix(redis_url)
    client = aioredis.Redis.from_url(clean)
    stream, tally = stream_key("normal", prefix), tally_key("normal", prefix)

    async def lags() -> tuple[int, int]:
        return await _lag(client, stream), await _lag(client, tally)

    try:
        # Two tenants: one with five jobs, one with one. The job stream holds one entry per
        # tenant (the rest wait in a backlog); the tally counts every job.
        for index in range(5):
            await store.submit(_job(f"a{index}", "a"), "")
        await store.submit(_job("b0", "b"), "")
        assert await lags() == (2, 6)
        assert (await store.depth())["normal"] == 6
        # A claim takes one job out of waiting (and admits its tenant's next into the stream).
        first = await store.claim("w", block=1.0)
        assert first is not None and first.job.job_id == "a0"
        assert await lags() == (2, 5)
        # Cancelled from the backlog: no longer waiting.
        cancelled = await store.cancel("a3")
        assert cancelled is not None and cancelled.state == "cancelled"
        assert await lags() == (2, 4)
        # Cancelled while its entry is in the job stream: it still waits there until a worker
        # reads (and skips) the entry, which takes it out of the tally then.
        assert await store.cancel("b0") is not None
        assert (await lags())[1] == 4
        # Parked until its quota returns: not waiting; due again, it is.
        second = await store.claim("w", block=1.0)
        assert second is not None and second.job.job_id == "a1"  # b0's entry was read and skipped
        parked_lag = (await lags())[1]
        assert parked_lag == 2  # a2 in the stream, a4 in the backlog
        await store.park(second, time.time() - 1)
        assert (await lags())[1] == parked_lag
        assert await store.promote_due() == 1
        assert (await lags())[1] == parked_lag + 1
        # A worker that died: its job is put back in line and counted again.
        assert await store.reclaim("other", 0.0) == 1
        after_reclaim = (await lags())[1]
        assert after_reclaim == parked_lag + 2
        # Drain everything: both lags reach zero together, the tally leaves no entries behind.
        claims = []
        while (claim := await store.claim("w", block=0.2)) is not None:
            claims.append(claim)
        assert sorted(c.job.job_id for c in claims) == ["a0", "a1", "a2", "a4"]
        assert await lags() == (0, 0)
        for claim in claims:
            claim.job.state = SUCCEEDED
            await store.finish(claim, claim.job)
        assert await client.xlen(tally) <= 1
        assert (await store.depth())["normal"] == 0
    finally:
        await client.aclose()
        await store.close()
