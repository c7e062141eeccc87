"""One contract, every cache store: memory, Redis (the real one on 127.0.0.1) and a Redis Cluster."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from services.cache.index import AnnParams
from services.cache.store import CacheStore, Entry, StoreOptions, open_store
from services.cache.store.base import KIND_ANSWER, KIND_TOOL
from services.cache.store.redis import RedisStore

DIM = 8
NOW = 1_700_000_000.0


def unit(*values: float) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[: len(values)] = values
    return (v / np.linalg.norm(v)).astype(np.float32)


def answer(
    key: str,
    vector: np.ndarray | None = None,
    *,
    tenant: str = "t1",
    namespace: str = "default",
    partition: str = "p1",
    ttl: float = 60.0,
    attributes: dict[str, str] | None = None,
    payload: bytes = b"answer",
) -> Entry:
    return Entry(
        id=uuid.uuid4().hex,
        kind=KIND_ANSWER,
        tenant_id=tenant,
        namespace=namespace,
        key=key,
        payload=payload,
        created_at=NOW,
        expires_at=NOW + ttl,
        partition=partition,
        text=f"text of {key}",
        vector=vector,
        attributes=attributes or {},
    )


async def _open(kind: str, url: str, max_bytes: int = 10_000_000, **options: Any) -> CacheStore:
    store = open_store(
        url, StoreOptions(max_bytes=max_bytes, dim=DIM, ann=AnnParams(threshold=10_000), **options)
    )
    await store.start()
    if isinstance(store, RedisStore):
        await asyncio.wait_for(store.synced.wait(), 10)
    return store


@pytest.fixture(params=["memory", "redis", "cluster"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[object]:
    """memory://, one Redis, and a real three-primary Redis Cluster (the session's)."""
    opened: list[CacheStore] = []
    fixture = {"redis": "redis_url", "cluster": "redis_cluster_url"}.get(request.param)
    url: str = "memory://" if fixture is None else request.getfixturevalue(fixture)

    async def factory(max_bytes: int = 10_000_000, **options: Any) -> CacheStore:
        store = await _open(request.param, url, max_bytes, **options)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()


async def test_put_get_and_replace_by_key(make_store: object) -> None:
    store: CacheStore = await make_store()  # type: ignore[operator]
    first = answer("k1", payload=b"one")
    await store.put(first, NOW)
    got = await store.get("t1", "k1", NOW)
    assert got is not None and got.id == first.id and got.payload == b"one"
    assert got.text == "text of k1" and got.partition == "p1" and got.expires_at == NOW + 60
    second = answer("k1", payload=b"two")
    await store.put(second, NOW)
    got = await store.get("t1", "k1", NOW)
    assert got is not None and got.id == second.id and got.payload == b"two"
    [stats] = await store.stats("t1", None, NOW)
    assert stats.entries == 1
    assert await store.get("t1", "nope", NOW) is None


async def test_search_stays_in_its_partition_best_first(make_store: object) -> None:
    store: CacheStore = await make_store()  # type: ignore[operator]
    near = answer("a", unit(1, 0.1))
    far = answer("b", unit(0.2, 1))
    other = answer("c", unit(1, 0.1), partition="p2", tenant="t2")
    for entry in (near, far, other):
        await store.put(entry, NOW)
    found = await store.search("t1", "p1", unit(1, 0), 5, NOW)
    assert [e.id for e, _ in found] == [near.id, far.id]
    assert found[0][1] == pytest.approx(float(unit(1, 0.1) @ unit(1, 0)), abs=1e-5)
    assert [e.id for e, _ in await store.search("t2", "p2", unit(1, 0), 5, NOW)] == [other.id]
    assert await store.search("t1", "p3", unit(1, 0), 5, NOW) == []


async def test_expired_entries_are_never_returned(make_store: object) -> None:
    store: CacheStore = await make_store()  # type: ignore[operator]
    await store.put(answer("short", unit(1), ttl=10), NOW)
    await store.put(answer("long", unit(0, 1), ttl=100), NOW)
    later = NOW + 11
    assert await store.get("t1", "short", later) is None
    assert [e.key for e, _ in await store.search("t1", "p1", unit(1), 5, later)] == ["long"]
    [stats] = await store.stats("t1", "default", later)
    assert stats.entries == 1


async def test_delete_by_id_namespace_and_attribute(make_store: object) -> None:
    store: CacheStore = await make_store()  # type: ignore[operator]
    a = answer("a", unit(1), attributes={"doc": "pricing"})
    b = answer("b", unit(1, 1), namespace="sales", attributes={"doc": "pricing"})
    c = answer("c", unit(0, 1), attributes={"doc": "about"})
    d = answer("d", tenant="t2", attributes={"doc": "pricing"})
    tool = Entry(uuid.uuid4().hex, KIND_TOOL, "t1", "default", "tool-key", b"r", NOW, NOW + 60)
    for entry in (a, b, c, d, tool):
        await store.put(entry, NOW)
    assert await store.delete_ids("t2", [a.id]) == 0  # not the owner
    assert await store.delete_attribute("t1", "sales", "doc", "pricing") == 1
    assert await store.get("t1", "b", NOW) is None and await store.get("t1", "a", NOW) is not None
    assert await store.delete_attribute("t1", None, "doc", "pricing") == 1
    assert await store.get("t1", "a", NOW) is None and await store.get("t2", "d", NOW) is not None
    assert await store.delete_ids("t1", [c.id, "missing"]) == 1
    assert await store.search("t1", "p1", unit(0, 1), 5, NOW) == []
    assert await store.delete_namespace("t1", "default") == 1  # the tool result
    assert await store.get("t1", "tool-key", NOW) is None
    assert await store.delete_namespace("t2", "default") == 1


async def test_byte_bound_evicts_least_recently_used(make_store: object) -> None:
    store: CacheStore = await make_store(max_bytes=3000)  # type: ignore[operator]
    entries = [answer(f"k{i}", unit(1, i), payload=b"x" * 600) for i in range(4)]
    for i, entry in enumerate(entries[:3]):
        await store.put(entry, NOW + i)
    assert await store.get("t1", "k0", NOW + 5) is not None  # k0 is now the most recently used
    await store.put(entries[3], NOW + 6)
    assert await store.get("t1", "k1", NOW + 7) is None
    assert await store.get("t1", "k0", NOW + 7) is not None
    [stats] = await store.stats("t1", "default", NOW + 7)
    assert stats.evictions >= 1 and stats.bytes <= 3000
    assert stats.entries == 3 and stats.bytes == sum(e.size for e in entries[:3])
    assert [e.key for e, _ in await store.search("t1", "p1", unit(1, 1), 5, NOW + 7)] != ["k1"]


async def test_counters_stats_and_versions(make_store: object) -> None:
    store: CacheStore = await make_store()  # type: ignore[operator]
    await store.count(
        "t1", "default", {"lookups": 3, "exact_hits": 1, "semantic_hits": 1, "guard_rejections": 2}
    )
    await store.count("t1", "other", {"lookups": 1})
    await store.put(answer("a", unit(1)), NOW)
    stats = {s.namespace: s for s in await store.stats("t1", None, NOW)}
    assert set(stats) == {"default", "other"}
    d = stats["default"]
    assert (d.lookups, d.exact_hits, d.semantic_hits, d.guard_rejections) == (3, 1, 1, 2)
    assert d.entries == 1 and d.bytes == answer("a", unit(1)).size
    assert stats["other"].lookups == 1 and stats["other"].entries == 0
    assert await store.stats("t2", None, NOW) == []
    assert await store.version("t1", "idx") == 0
    assert await store.bump_version("t1", "idx") == 1
    assert await store.version("t1", "idx") == 1


async def test_more_concurrent_calls_than_redis_connections_wait_for_one(redis_url: str) -> None:
    options = StoreOptions(dim=DIM, ann=AnnParams(threshold=10_000), pool_size=2, timeout=5.0)
    store = RedisStore(redis_url, options)
    await store.start()
    try:
        await store.put(answer("busy"), NOW)
        # Fifty callers, two connections: they queue for a connection rather than fail.
        found = await asyncio.gather(*(store.get("t1", answer("busy").key, NOW) for _ in range(50)))
        assert all(entry is not None and entry.payload == answer("busy").payload for entry in found)
    finally:
        await store.close()


async def _present(store: CacheStore, keys: list[str], now: float) -> list[str]:
    return [key for key in keys if await store.get(key.split("-")[0], key, now) is not None]


async def test_a_tenant_at_its_quota_evicts_only_its_own_oldest_entries(make_store: object) -> None:
    size = answer("noisy-0", unit(1), tenant="noisy", payload=b"x" * 600).size
    store: CacheStore = await make_store(  # type: ignore[operator]
        max_tenant_bytes=3 * size, tenant_max_bytes={"roomy": 5 * size}
    )
    quiet = [f"quiet-{i}" for i in range(2)]
    for i, key in enumerate(quiet):
        await store.put(answer(key, unit(1, i), tenant="quiet", payload=b"x" * 600), NOW + i)
    noisy = [f"noisy-{i}" for i in range(10)]
    for i, key in enumerate(noisy):
        await store.put(answer(key, unit(2, i), tenant="noisy", payload=b"x" * 600), NOW + 10 + i)
    roomy = [f"roomy-{i}" for i in range(6)]
    for i, key in enumerate(roomy):
        await store.put(answer(key, unit(3, i), tenant="roomy", payload=b"x" * 600), NOW + 30 + i)
    later = NOW + 50
    assert await _present(store, quiet, later) == quiet
    assert await _present(store, noisy, later) == noisy[-3:]
    assert await _present(store, roomy, later) == roomy[-5:]
    [stats] = await store.stats("noisy", "default", later)
    assert stats.evictions == 7 and stats.bytes == 3 * size
    [quiet_stats] = await store.stats("quiet", "default", later)
    assert quiet_stats.evictions == 0


async def test_over_the_whole_bound_the_heaviest_tenant_gives_way(make_store: object) -> None:
    size = answer("noisy-00", unit(1), tenant="noisy", payload=b"x" * 600).size
    store: CacheStore = await make_store(max_bytes=6 * size)  # type: ignore[operator]
    # The quiet tenant's entries are the least recently used in the whole cache.
    quiet = ["quiet-00", "quiet-01"]
    for i, key in enumerate(quiet):
        await store.put(answer(key, unit(1, i), tenant="quiet", payload=b"x" * 600), NOW + i)
    noisy = [f"noisy-{i:02d}" for i in range(12)]
    for i, key in enumerate(noisy):
        await store.put(answer(key, unit(2, i), tenant="noisy", payload=b"x" * 600), NOW + 10 + i)
    later = NOW + 50
    assert await _present(store, quiet, later) == quiet
    assert await _present(store, noisy, later) == noisy[-4:]
