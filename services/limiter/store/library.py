"""redis-py's asyncio client behind the same small interface as the pipelined connection.

The limiter's Redis store needs two calls, `execute` (an EVALSHA) and `script_load`; this module
gives them over redis-py, on one node (`redis.asyncio.Redis`) or on a Redis Cluster
(`redis.asyncio.RedisCluster`, which routes each EVALSHA by its keys' slot, follows MOVED/ASK
and rediscovers the cluster after a failover). All keys of one call share a hash tag, so a
decision is one EVALSHA on one shard either way.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rx

from services.limiter.store.base import StoreUnavailableError
from services.limiter.store.pipelined import RedisReplyError

# Errors that mean "no answer from Redis now": the fail mode decides.
_UNREACHABLE = (
    rx.ConnectionError,
    rx.TimeoutError,
    rx.ClusterDownError,
    rx.ClusterError,
    rx.TryAgainError,
    rx.MasterDownError,
    rx.ReadOnlyError,
    rx.BusyLoadingError,
    rx.RedisClusterException,
)


class LibraryRedis:
    """One redis-py client (pooled connections), or a cluster client, for the limiter's scripts."""

    def __init__(self, url: str, *, timeout: float, cluster: bool, pool_size: int = 64) -> None:
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "max_connections": pool_size,
        }
        self.cluster = cluster
        self.client: aioredis.Redis | aioredis.RedisCluster
        if cluster:
            self.client = aioredis.RedisCluster.from_url(url, **options)
        else:
            self.client = aioredis.Redis.from_url(url, **options)

    async def execute(self, *args: Any) -> Any:
        try:
            return await self.client.execute_command(*args)
        except rx.NoScriptError as exc:
            raise RedisReplyError(f"NOSCRIPT {exc}") from exc
        except _UNREACHABLE as exc:
            raise StoreUnavailableError(repr(exc)) from exc
        except rx.ResponseError as exc:
            raise RedisReplyError(str(exc)) from exc

    async def script_load(self, source: str) -> str:
        """Loads a script (on every primary of a cluster); its SHA1."""
        try:
            sha = await self.client.script_load(source)
        except _UNREACHABLE as exc:
            raise StoreUnavailableError(repr(exc)) from exc
        return sha.decode() if isinstance(sha, bytes) else str(sha)

    async def close(self) -> None:
        await self.client.aclose()
