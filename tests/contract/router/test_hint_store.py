"""The hint store contract, run against memory, the real Redis and a real Redis Cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.router.store import COOLDOWN, OPEN, Hint, HintStore, open_hint_store


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[HintStore]:
    fixture = {"redis": "redis_url", "redis-cluster": "redis_cluster_url"}.get(request.param)
    url: str = request.getfixturevalue(fixture) if fixture else "memory://"
    hint_store = open_hint_store(url)
    yield hint_store
    await hint_store.close()


async def test_published_hints_are_active_with_their_time_left(store: HintStore) -> None:
    assert await store.active() == []
    await store.publish(Hint(OPEN, "p", "m", 30.0))
    await store.publish(Hint(COOLDOWN, "p", "m", 5.0))
    hints = {(h.kind, h.provider, h.model): h.remaining for h in await store.active()}
    assert set(hints) == {(OPEN, "p", "m"), (COOLDOWN, "p", "m")}
    assert 29.0 < hints[(OPEN, "p", "m")] <= 30.0
    assert 4.0 < hints[(COOLDOWN, "p", "m")] <= 5.0


async def test_a_newer_hint_replaces_the_older_one(store: HintStore) -> None:
    await store.publish(Hint(OPEN, "p", "m", 30.0))
    await store.publish(Hint(OPEN, "p", "m", 2.0))
    (hint,) = await store.active()
    assert hint.remaining <= 2.0


async def test_clear_and_expiry(store: HintStore) -> None:
    await store.publish(Hint(OPEN, "p", "m", 30.0))
    await store.publish(Hint(OPEN, "p", "other|model", 0.05))
    await store.clear(OPEN, "p", "m")
    await store.clear(OPEN, "nobody", "x")  # clearing nothing is fine
    assert [(h.provider, h.model) for h in await store.active()] == [("p", "other|model")]
    await asyncio.sleep(0.1)
    assert await store.active() == []
