"""The cache's Redis store on a real Redis Cluster (three primaries, each with a replica).

A tenant's keys share one slot, so a Lookup is one script call on the tenant's shard and a Store
one on the tenant's shard plus one on the `{cache}` shard (the cross-tenant bookkeeping); a
replica started later replays the entries of every shard; reads and writes continue, with nothing
lost, when the tenant's primary fails over to its replica.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pytest
import redis

from services.cache.index import AnnParams
from services.cache.store import Entry, StoreOptions
from services.cache.store.base import KIND_ANSWER
from services.cache.store.redis import RedisStore
from services.kit.errors import Unavailable
from tests.support.backends import PrivateRedisCluster, free_port

DIM = 8
# Real time: a replay drops entries that expired by the wall clock.
NOW = time.time()
TENANTS = [f"tenant-{i}" for i in range(12)]
# What a client may send for itself (topology, handshakes) and replication traffic, and the change
# stream's blocking read (the follower), which are not calls of a Lookup or a Store.
HOUSEKEEPING = {"cluster", "command", "info", "config", "ping", "readonly", "client", "hello"}
HOUSEKEEPING |= {"replconf", "psync", "sync", "xread"}
# Commands the scripts run inside Redis (not round trips).
SCRIPT_INTERNAL = {
    "get", "set", "del", "incr", "incrby", "decrby", "hget", "hmget", "hset", "hincrby", "pexpire",
    "zadd", "zrem", "zincrby", "zscore", "zrange", "zrevrange", "zrangebyscore", "sadd", "srem", "xadd",
}  # fmt: skip


def vector(i: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[i % DIM] = 1.0
    v[(i + 1) % DIM] = 0.1 * (i // DIM + 1)
    return (v / np.linalg.norm(v)).astype(np.float32)


def entry(tenant: str, key: str, i: int) -> Entry:
    return Entry(
        id=uuid.uuid4().hex,
        kind=KIND_ANSWER,
        tenant_id=tenant,
        namespace="default",
        key=key,
        payload=f"answer {key}".encode(),
        created_at=NOW,
        expires_at=NOW + 3600,
        partition=f"p-{tenant}",
        text=f"question {key}",
        vector=vector(i),
        attributes={"doc": f"d{i % 3}"},
    )


@pytest.fixture
def cluster(redis_cluster: PrivateRedisCluster) -> PrivateRedisCluster:
    return redis_cluster


@pytest.fixture
def prefix(redis_cluster_url: str) -> str:
    return dict(parse_qsl(urlsplit(redis_cluster_url).query))["key_prefix"]


@pytest.fixture
async def opened(redis_cluster_url: str) -> AsyncIterator[list[RedisStore]]:
    stores: list[RedisStore] = []
    yield stores
    for store in stores:
        await store.close()


async def open_store(url: str, stores: list[RedisStore], max_bytes: int = 256 << 20) -> RedisStore:
    options = StoreOptions(max_bytes=max_bytes, dim=DIM, ann=AnnParams(threshold=10_000), timeout=30.0)
    store = RedisStore(url, options)
    await store.start()
    await asyncio.wait_for(store.synced.wait(), 30)
    stores.append(store)
    return store


@pytest.fixture
def clients(cluster: PrivateRedisCluster) -> Iterator[dict[int, redis.Redis]]:
    found = {port: redis.Redis(port=port) for port in cluster.ports}
    yield found
    for client in found.values():
        client.close()


def sent(cluster: PrivateRedisCluster, clients: dict[int, redis.Redis]) -> dict[int, dict[str, int]]:
    """The commands clients sent each primary since the last reset (housekeeping left out)."""
    out = {}
    for port in cluster.primaries():
        stats = clients[port].info("commandstats")
        calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        skip = HOUSEKEEPING | SCRIPT_INTERNAL
        out[port] = {n: c for n, c in calls.items() if n.split("|")[0] not in skip}
    return out


async def test_a_tenants_keys_share_one_slot_and_each_call_is_one_script_on_its_shard(
    redis_cluster_url: str,
    prefix: str,
    cluster: PrivateRedisCluster,
    clients: dict[int, redis.Redis],
    opened: list[RedisStore],
) -> None:
    store = await open_store(redis_cluster_url, opened)
    assert store.cluster
    for i, tenant in enumerate(TENANTS):
        for j in range(3):
            await store.put(entry(tenant, f"{tenant}-k{j}", i + j), NOW)
        await store.count(tenant, "default", {"lookups": 1})
        await store.bump_version(tenant, "index")

    # Every key of a tenant hashes to its tag's slot; the others are the `{cache}` bookkeeping.
    slots: dict[str, set[int]] = {}
    owners: dict[str, set[int]] = {}
    for port in cluster.primaries():
        for raw in clients[port].scan_iter(match=f"{prefix}*", count=1000):
            key = raw.decode()
            tag = key[key.index("{") + 1 : key.index("}")]
            slots.setdefault(tag, set()).add(int(clients[port].cluster("keyslot", key)))
            owners.setdefault(tag, set()).add(port)
    assert set(slots) == {f"t:{t}" for t in TENANTS} | {"cache"}
    assert all(len(s) == 1 for s in slots.values()), slots
    # Twelve tenants are spread over the three shards.
    assert len({port for ports in owners.values() for port in ports}) == 3

    tenant = TENANTS[0]
    owner = cluster.master_of(f"{{t:{tenant}}}")
    # Every shard has the scripts (a first call on a shard loads them: NOSCRIPT, SCRIPT LOAD).
    await store.get(tenant, f"{tenant}-k0", NOW)
    for client in clients.values():
        client.config_resetstat()
    lookups = 20
    for n in range(lookups):
        found = await store.get(tenant, f"{tenant}-k{n % 3}", NOW)
        assert found is not None and found.payload == f"answer {tenant}-k{n % 3}".encode()
    calls = sent(cluster, clients)
    assert calls[owner] == {"evalsha": lookups}
    assert all(not c for port, c in calls.items() if port != owner), calls

    # A Store: one script on the tenant's shard, one on the `{cache}` shard.
    bookkeeper = cluster.master_of("{cache}")
    for client in clients.values():
        client.config_resetstat()
    await store.put(entry(tenant, f"{tenant}-new", 7), NOW)
    calls = sent(cluster, clients)
    expected: dict[int, dict[str, int]] = {port: {} for port in cluster.primaries()}
    for port in (owner, bookkeeper):
        expected[port]["evalsha"] = expected[port].get("evalsha", 0) + 1
    assert calls == expected


async def test_a_replica_started_later_replays_every_shard_and_the_bound_spans_them(
    redis_cluster_url: str, opened: list[RedisStore]
) -> None:
    first = await open_store(redis_cluster_url, opened)
    for i, tenant in enumerate(TENANTS):
        await first.put(entry(tenant, f"{tenant}-k", i), NOW)
    later = await open_store(redis_cluster_url, opened)
    for i, tenant in enumerate(TENANTS):
        found = await later.search(tenant, f"p-{tenant}", vector(i), 1, NOW)
        assert [e.key for e, _ in found] == [f"{tenant}-k"]
        # Another tenant's partition is never searched into this tenant's answers.
        assert await later.search(TENANTS[(i + 1) % len(TENANTS)], f"p-{tenant}", vector(i), 1, NOW) == []

    # A third replica with a whole-cache bound of six entries: writes on any shard evict the
    # heaviest tenant's oldest entries, on that tenant's shard, until the cache is under it.
    heavy = "tenant-heavy"
    held = sum(entry(t, f"{t}-k", i).size for i, t in enumerate(TENANTS))
    bound = held + sum(entry(heavy, f"heavy-{n}", n).size for n in range(4, 10))
    bounded = await open_store(redis_cluster_url, opened, max_bytes=bound)
    for n in range(10):
        await bounded.put(entry(heavy, f"heavy-{n}", n), NOW + n)
    present = [n for n in range(10) if await bounded.get(heavy, f"heavy-{n}", NOW + 20) is not None]
    assert present == [4, 5, 6, 7, 8, 9]
    for tenant in TENANTS:
        assert await bounded.get(tenant, f"{tenant}-k", NOW + 20) is not None
    [stats] = await bounded.stats(heavy, "default", NOW + 20)
    assert stats.entries == 6 and stats.evictions == 4


async def test_reads_and_writes_continue_through_a_failover_and_nothing_is_lost(
    redis_cluster_url: str, cluster: PrivateRedisCluster, opened: list[RedisStore]
) -> None:
    store = await open_store(redis_cluster_url, opened)
    tenant = "tenant-failover"
    for j in range(20):
        await store.put(entry(tenant, f"before-{j}", j), NOW)
    owner = cluster.master_of(f"{{t:{tenant}}}")

    stop = asyncio.Event()
    written: list[str] = []
    read = 0

    async def traffic() -> None:
        nonlocal read
        n = 0
        while not stop.is_set():
            key = f"during-{n}"
            await store.put(entry(tenant, key, n), NOW)
            written.append(key)
            assert await store.get(tenant, f"before-{n % 20}", NOW) is not None
            read += 1
            n += 1

    load = asyncio.create_task(traffic())
    try:
        new_owner = await asyncio.to_thread(cluster.fail_over, owner)
    finally:
        stop.set()
        await load
    assert new_owner != owner and cluster.master_of(f"{{t:{tenant}}}") == new_owner
    assert written and read
    for key in [f"before-{j}" for j in range(20)] + written:
        assert await store.get(tenant, key, NOW) is not None, key
    await store.put(entry(tenant, "after", 1), NOW)
    [found] = await store.search(tenant, f"p-{tenant}", vector(1), 1, NOW)
    assert found[0].tenant_id == tenant
    [stats] = await store.stats(tenant, "default", NOW)
    assert stats.entries == 20 + len(written) + 1


async def test_a_count_left_wrong_by_a_dead_replica_is_set_right_by_the_next_eviction(
    redis_cluster_url: str, prefix: str, cluster: PrivateRedisCluster, opened: list[RedisStore]
) -> None:
    tenant = "tenant-real"
    sizes = [entry(tenant, f"real-{n}", n).size for n in range(4)]
    store = await open_store(redis_cluster_url, opened, max_bytes=sum(sizes) + 1000)
    for n in range(3):
        await store.put(entry(tenant, f"real-{n}", n), NOW + n)
    # A replica died between a tenant's script and its bookkeeping call: the count says a tenant
    # holds 50 kB it does not hold (its entries are gone), and the whole cache looks full.
    client = redis.RedisCluster(host="127.0.0.1", port=cluster.primaries()[0])
    try:
        client.zincrby(f"{prefix}cache:{{cache}}tbytes", 50_000, "tenant-ghost")
        client.incrby(f"{prefix}cache:{{cache}}bytes", 50_000)
        # The next write goes over the bound: the ghost gives way first, and finding nothing
        # to evict its count is set to what its shard holds (nothing): no real entry is evicted.
        await store.put(entry(tenant, "real-3", 3), NOW + 3)
        assert client.zscore(f"{prefix}cache:{{cache}}tbytes", "tenant-ghost") is None
        assert int(client.get(f"{prefix}cache:{{cache}}bytes") or 0) == sum(sizes)
    finally:
        client.close()
    for n in range(4):
        assert await store.get(tenant, f"real-{n}", NOW + 5) is not None


async def test_a_cluster_with_no_reachable_node_is_unavailable_not_an_internal_error() -> None:
    # redis-py's cluster client raises RedisClusterUnreachableError, which is not a RedisError.
    url = f"redis://127.0.0.1:{free_port()}/0?cluster=true"
    store = RedisStore(url, StoreOptions(dim=DIM, timeout=1.0))
    try:
        with pytest.raises(Unavailable, match="cache store"):
            await store.get("t1", "k", NOW)
        with pytest.raises(Unavailable, match="cache store"):
            await store.put(entry("t1", "k", 0), NOW)
    finally:
        await store.close()
