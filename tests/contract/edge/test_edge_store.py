"""The same queue and key cases against the memory store and the Redis Streams store, on one Redis
and on a Redis Cluster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from services.edge import auth
from services.edge.store import (
    CANCELLED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    CapReachedError,
    EdgeStore,
    JobCaps,
    JobRecord,
)
from services.edge.store.memory import MemoryEdgeStore
from services.edge.store.redis import RedisEdgeStore
from services.kit.errors import Unavailable
from tests.support.backends import free_port
from tests.support.waiting import eventually


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[EdgeStore]:
    """memory://, one Redis, and the session's three-primary Redis Cluster (`?cluster=true`)."""
    if request.param == "memory":
        memory = MemoryEdgeStore()
        yield memory
        return
    url: str = request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url")
    redis_store = RedisEdgeStore(url)
    await redis_store.start()
    yield redis_store
    await redis_store.close()


def _job(job_id: str, priority: str = "normal", tenant: str = "acme", user: str = "u") -> JobRecord:
    return JobRecord(
        job_id=job_id,
        tenant_id=tenant,
        user_id=user,
        priority=priority,
        request=b"\x01req",
        caller=b"\x02caller",
        created_at=time.time(),
    )


async def test_jobs_are_claimed_highest_priority_first(store: EdgeStore) -> None:
    for job_id, priority in [("a", "low"), ("b", "normal"), ("c", "high"), ("d", "low"), ("e", "critical")]:
        await store.submit(_job(job_id, priority), "")
    order = []
    for _ in range(5):
        claim = await store.claim("w1", block=0.5)
        assert claim is not None
        assert claim.job.state == RUNNING and claim.job.attempts == 1
        assert claim.job.request == b"\x01req"
        order.append(claim.job.job_id)
    assert order == ["e", "c", "b", "a", "d"]
    assert await store.claim("w1", block=0.1) is None


async def test_submit_is_idempotent_per_tenant_and_user(store: EdgeStore) -> None:
    first = await store.submit(_job("j1"), "key-1")
    again = await store.submit(_job("j2"), "key-1")
    other_tenant = await store.submit(_job("j3", tenant="globex"), "key-1")
    other_user = await store.submit(_job("j4", user="mallory"), "key-1")
    # Ids that would run together if the scope were joined with ':'.
    joined_a = await store.submit(_job("j5", tenant="a:b", user="c"), "k")
    joined_b = await store.submit(_job("j6", tenant="a", user="b:c"), "k")
    assert again.job_id == first.job_id == "j1"
    assert other_tenant.job_id == "j3"
    assert other_user.job_id == "j4" and other_user.user_id == "mallory"
    assert (joined_a.job_id, joined_b.job_id) == ("j5", "j6")
    assert sum((await store.depth()).values()) == 5


async def test_finish_is_recorded_once(store: EdgeStore) -> None:
    await store.submit(_job("j"), "")
    claim = await store.claim("w1", block=0.5)
    assert claim is not None
    done = claim.job
    done.state, done.result = SUCCEEDED, b"answer"
    assert await store.finish(claim, done) is True
    late = JobRecord(**{**done.__dict__, "result": b"other"})
    assert await store.finish(claim, late) is False
    stored = await store.get_job("j")
    assert stored is not None and stored.state == SUCCEEDED and stored.result == b"answer"


async def test_a_silent_workers_job_is_reclaimed_and_runs_again(store: EdgeStore) -> None:
    await store.submit(_job("j"), "")
    dead = await store.claim("dead-worker", block=0.5)
    assert dead is not None
    assert await store.claim("w2", block=0.05) is None
    await asyncio.sleep(0.25)
    assert await store.reclaim("w2", min_idle=0.2) == 1
    again = await store.claim("w2", block=0.5)
    assert again is not None and again.job.job_id == "j" and again.job.attempts == 2
    finished = again.job
    finished.state = SUCCEEDED
    assert await store.finish(again, finished)
    # The dead worker's late result is dropped.
    assert not await store.finish(dead, JobRecord(**{**dead.job.__dict__, "state": SUCCEEDED}))


async def test_heartbeat_keeps_a_claim(store: EdgeStore) -> None:
    await store.submit(_job("j"), "")
    claim = await store.claim("w1", block=0.5)
    assert claim is not None
    await asyncio.sleep(0.15)
    await store.heartbeat(claim, "w1")
    assert await store.reclaim("w2", min_idle=0.1) == 0


async def test_a_parked_job_waits_until_due(store: EdgeStore) -> None:
    await store.submit(_job("j"), "")
    claim = await store.claim("w1", block=0.5)
    assert claim is not None
    await store.park(claim, time.time() + 0.3)
    parked = await store.get_job("j")
    assert parked is not None and parked.state == QUEUED
    assert await store.claim("w1", block=0.1) is None
    later = await store.claim("w1", block=1.0)
    assert later is not None and later.job.job_id == "j"


async def test_cancel_only_stops_a_queued_job(store: EdgeStore) -> None:
    await store.submit(_job("j1"), "")
    await store.submit(_job("j2"), "")
    cancelled = await store.cancel("j1")
    assert cancelled is not None and cancelled.state == CANCELLED
    claim = await store.claim("w", block=0.5)
    assert claim is not None and claim.job.job_id == "j2"
    running = await store.cancel("j2")
    assert running is not None and running.state == RUNNING
    assert await store.cancel("nope") is None


async def test_depth_counts_queued_jobs_per_priority(store: EdgeStore) -> None:
    await store.submit(_job("a", "low"), "")
    await store.submit(_job("b", "low"), "")
    await store.submit(_job("c", "high"), "")
    depth = await store.depth()
    assert depth["low"] == 2 and depth["high"] == 1 and depth["normal"] == 0
    claim = await store.claim("w", block=0.5)
    assert claim is not None
    assert (await store.depth())["high"] == 0


async def test_keys_round_trip(store: EdgeStore) -> None:
    key, _ = auth.new_key("acme", "alice", "paid", "eu")
    await store.put_key(key)
    assert await store.key_by_hash(key.sha256) == key
    assert await store.key_by_id(key.key_id) == key
    other, _ = auth.new_key("globex", "bob", "free")
    await store.put_key(other)
    assert await store.list_keys("acme", 0, 10) == [key]
    assert len(await store.list_keys("", 0, 10)) == 2


async def test_with_every_connection_held_by_waiting_workers_a_call_waits_instead_of_failing(
    redis_url: str,
) -> None:
    small = RedisEdgeStore(redis_url, pool_size=3, socket_timeout=3.0)
    await small.start()
    try:
        key, _ = auth.new_key("acme", "carol", "paid")
        await small.put_key(key)
        # Three workers block reading an empty queue: each holds one of the three connections.
        claims = [asyncio.ensure_future(small.claim(f"worker-{i}", block=1.0)) for i in range(3)]
        pool = small._redis.connection_pool
        await eventually(lambda: len(pool._in_use_connections) == 3, what="every connection held")
        # Nothing awaits between this check and the call asking for a connection, so no claim can
        # hand its connection back in between: the call finds the pool empty and must wait. It is
        # answered, not refused, once a blocked read has given its connection back (ordering, not
        # elapsed time: the machine's speed does not matter).
        assert not any(claim.done() for claim in claims)
        assert await small.key_by_hash(key.sha256) == key
        assert any(claim.done() for claim in claims)
        assert await asyncio.gather(*claims) == [None, None, None]
    finally:
        await small.close()


# --- fairness and caps ------------------------------------------------------------------------------


async def _claim_order(store: EdgeStore, count: int) -> list[str]:
    order = []
    for _ in range(count):
        claim = await store.claim("w", block=0.5)
        assert claim is not None
        order.append(claim.job.job_id)
    return order


async def test_tenants_take_turns_within_a_priority(store: EdgeStore) -> None:
    for index in range(20):
        await store.submit(_job(f"noisy-{index}", tenant="noisy"), "")
    await store.submit(_job("quiet-1", tenant="quiet"), "")
    await store.submit(_job("other-1", tenant="other"), "")
    await store.submit(_job("urgent", "high", tenant="noisy"), "")
    order = await _claim_order(store, 6)
    # Priority first; then at most one noisy job before each other tenant's.
    assert order[0] == "urgent"
    assert set(order[1:4]) == {"noisy-0", "quiet-1", "other-1"}, order
    assert order[4:] == ["noisy-1", "noisy-2"]
    assert sum((await store.depth()).values()) == 23 - 6


async def test_a_noisy_tenants_1500_jobs_delay_another_tenants_job_by_at_most_one(store: EdgeStore) -> None:
    """The acceptance case of fair queueing, counted in claims rather than seconds."""
    for index in range(1500):
        await store.submit(_job(f"noisy-{index}", tenant="noisy"), "")
    # Workers are busy with the noisy tenant when the quiet tenant's single job arrives.
    before = await _claim_order(store, 10)
    assert before == [f"noisy-{index}" for index in range(10)]
    await store.submit(_job("quiet", tenant="quiet"), "")
    after = await _claim_order(store, 2)
    assert "quiet" in after, after
    assert (await store.depth())["normal"] == 1500 - 11


async def test_a_cancelled_job_waiting_its_turn_is_never_claimed(store: EdgeStore) -> None:
    for job_id in ("a", "b", "c"):
        await store.submit(_job(job_id), "")
    cancelled = await store.cancel("b")
    assert cancelled is not None and cancelled.state == CANCELLED
    assert (await store.depth())["normal"] == 2
    assert await _claim_order(store, 2) == ["a", "c"]
    assert await store.claim("w", block=0.1) is None


async def test_a_parked_job_keeps_its_turn_over_its_tenants_later_jobs(store: EdgeStore) -> None:
    await store.submit(_job("first"), "")
    claim = await store.claim("w", block=0.5)
    assert claim is not None
    for job_id in ("second", "third"):
        await store.submit(_job(job_id), "")
    await store.park(claim, time.time() + 0.2)
    assert await _claim_order(store, 1) == ["second"]
    # Once due it goes ahead of the tenant's remaining backlog ("third" may already be admitted).
    order = await _claim_order(store, 2)
    assert sorted(order) == ["first", "third"]


async def test_caps_on_queued_and_stored_jobs(store: EdgeStore) -> None:
    caps = JobCaps(queued_per_tenant=3, queued_per_user=2, stored_per_tenant=4, stored_per_user=0)
    await store.submit(_job("a1", user="alice"), "", caps)
    await store.submit(_job("a2", user="alice"), "k", caps)
    with pytest.raises(CapReachedError) as info:
        await store.submit(_job("a3", user="alice"), "k3", caps)
    assert info.value.cap == "queued_per_user"
    # A retry of an accepted job is answered, not refused.
    assert (await store.submit(_job("a2-again", user="alice"), "k", caps)).job_id == "a2"
    await store.submit(_job("b1", user="bob"), "", caps)
    with pytest.raises(CapReachedError) as info:
        await store.submit(_job("b2", user="bob"), "", caps)
    assert info.value.cap == "queued_per_tenant"
    assert await store.get_job("b2") is None
    # Other tenants are not affected.
    await store.submit(_job("g1", tenant="globex"), "", caps)
    # Ending jobs frees queued places but not stored ones.
    claim = await store.claim("w", block=0.5)
    assert claim is not None and claim.job.tenant_id == "acme"
    claim.job.state = SUCCEEDED
    assert await store.finish(claim, claim.job)
    await store.cancel("a2")
    await store.submit(_job("a3", user="alice"), "k3", caps)
    with pytest.raises(CapReachedError) as info:
        await store.submit(_job("a4", user="alice"), "", caps)
    assert info.value.cap == "stored_per_tenant"
    # A refused idempotency key is free to use once there is room.
    with pytest.raises(CapReachedError):
        await store.submit(_job("x", user="carol"), "retry-me", caps)
    assert (await store.submit(_job("x2", user="carol"), "retry-me", JobCaps())).job_id == "x2"


async def test_the_memory_store_forgets_ended_jobs_after_their_ttl() -> None:
    """Redis expires job records itself; the memory store drops ended ones past the TTL, which
    frees their place under the stored caps."""
    now = [1000.0]
    store = MemoryEdgeStore(clock=lambda: now[0], job_ttl=60)
    caps = JobCaps(stored_per_user=1)
    first = _job("old")
    first.created_at = now[0]
    await store.submit(first, "", caps)
    claim = await store.claim("w", block=0.1)
    assert claim is not None
    claim.job.state = SUCCEEDED
    assert await store.finish(claim, claim.job)
    with pytest.raises(CapReachedError):
        await store.submit(_job("refused"), "", caps)
    now[0] += 61
    second = _job("new")
    second.created_at = now[0]
    await store.submit(second, "", caps)
    assert await store.get_job("old") is None
    assert await store.get_job("new") is not None


async def test_a_redis_cluster_with_no_reachable_node_is_unavailable() -> None:
    # redis-py's cluster client raises RedisClusterUnreachableError, which is not a RedisError.
    store = RedisEdgeStore(f"redis://127.0.0.1:{free_port()}/0?cluster=true", socket_timeout=1.0)
    try:
        with pytest.raises(Unavailable, match="edge store"):
            await store.submit(_job("unreachable"), "")
        with pytest.raises(Unavailable, match="edge store"):
            await store.claim("w1", block=0.1)
    finally:
        await store.close()


async def test_a_settlement_is_recorded_once_per_key_until_dropped(store: EdgeStore) -> None:
    assert await store.settlement_count() == 0
    assert await store.pending_settlements(10) == []
    await store.put_settlement("r1", b"\x00first")
    await store.put_settlement("r2", b"second")
    # Recording the same settlement again replaces it: applied once, not twice.
    await store.put_settlement("r1", b"\x00first again")
    assert await store.settlement_count() == 2
    assert sorted(await store.pending_settlements(10)) == [("r1", b"\x00first again"), ("r2", b"second")]
    assert len(await store.pending_settlements(1)) == 1
    await store.drop_settlement("r1")
    await store.drop_settlement("never recorded")
    assert await store.pending_settlements(10) == [("r2", b"second")]
    assert await store.settlement_count() == 1
