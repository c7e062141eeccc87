"""Hints in Redis: one key per hint with a millisecond TTL (Redis keeps the time, so replicas'
clocks never matter) and an index set to find them. All keys share the `{router}` hash tag, so
on a Redis Cluster (`?cluster=true`) every call, transactions included, lands on one shard.
Keys carry the URL's `key_prefix`."""

from __future__ import annotations

from services.kit.redisconn import open_client, split_key_prefix
from services.router.store.base import Hint

# Hints are shared advice, read off the hot path: a few connections suffice, and a slow Redis
# must not hold a breaker decision for long (the router then goes on with its own view).
POOL_SIZE = 4
TIMEOUT_S = 1.0


class RedisHintStore:
    def __init__(self, url: str) -> None:
        clean, prefix = split_key_prefix(url)
        self._redis, _ = open_client(clean, pool_size=POOL_SIZE, timeout=TIMEOUT_S)
        self._index = f"{prefix}{{router}}:hints"
        self._key = f"{prefix}{{router}}:hint:"

    @staticmethod
    def _name(kind: str, provider: str, model: str) -> str:
        return f"{kind}|{provider}|{model}"

    async def publish(self, hint: Hint) -> None:
        name = self._name(hint.kind, hint.provider, hint.model)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key + name, "1", px=max(1, int(hint.remaining * 1000)))
            pipe.sadd(self._index, name)
            await pipe.execute()

    async def clear(self, kind: str, provider: str, model: str) -> None:
        name = self._name(kind, provider, model)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key + name)
            pipe.srem(self._index, name)
            await pipe.execute()

    async def active(self) -> list[Hint]:
        names = [
            n.decode() if isinstance(n, bytes) else str(n) for n in await self._redis.smembers(self._index)
        ]
        if not names:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.pttl(self._key + name)
            ttls = await pipe.execute()
        hints: list[Hint] = []
        expired: list[str] = []
        for name, ttl in zip(names, ttls, strict=True):
            if int(ttl) > 0:
                kind, provider, model = name.split("|", 2)
                hints.append(Hint(kind, provider, model, int(ttl) / 1000.0))
            else:
                expired.append(name)
        if expired:
            await self._redis.srem(self._index, *expired)
        return hints

    async def close(self) -> None:
        await self._redis.aclose()
