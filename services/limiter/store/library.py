"""The limiter store's Redis connection: redis-py's asyncio client, on one node or a Redis Cluster.

The store needs two calls, `execute` (an EVALSHA) and `script_load`. On one node they go through
a blocking pool of connections (the kit's `pooled_client`: past `pool_size` a call waits for a
connection rather than failing); on a Redis Cluster through `redis.asyncio.RedisCluster`, which
routes each EVALSHA by its keys' slot, follows MOVED/ASK and rediscovers the cluster after a
failover. All keys of one call share a hash tag, so a decision is one EVALSHA on one shard.

(This replaced a hand-written pipelined connection: measured side by side, redis-py 8.2 kept the
limiter above its throughput aim, and it brings Cluster support. See the README, Performance.)
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rx

from services.kit.redisconn import pooled_client
from services.limiter.store.base import StoreUnavailableError

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
# Error replies that mean "this Redis cannot serve now", as good as unreachable.
_UNAVAILABLE_REPLIES = ("LOADING", "READONLY", "OOM", "MASTERDOWN", "BUSY", "TRYAGAIN", "CLUSTERDOWN")


class RedisReplyError(Exception):
    """An error reply from Redis (a script error, a wrong type...), with Redis's message."""

    @property
    def code(self) -> str:
        return str(self).split(" ", 1)[0]


class LibraryRedis:
    """One redis-py client (a pool of connections), or a cluster client, for the limiter's scripts."""

    def __init__(self, url: str, *, timeout: float, cluster: bool, pool_size: int = 64) -> None:
        self.cluster = cluster
        self.client: aioredis.Redis | aioredis.RedisCluster
        if cluster:
            self.client = aioredis.RedisCluster.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout, max_connections=pool_size
            )
        else:
            self.client = pooled_client(url, pool_size=pool_size, timeout=timeout)

    async def execute(self, *args: Any) -> Any:
        try:
            return await self.client.execute_command(*args)
        except rx.NoScriptError as exc:
            raise RedisReplyError(f"NOSCRIPT {exc}") from exc
        except _UNREACHABLE as exc:
            raise StoreUnavailableError(repr(exc)) from exc
        except rx.ResponseError as exc:
            if str(exc).split(" ", 1)[0] in _UNAVAILABLE_REPLIES:
                raise StoreUnavailableError(f"Redis: {exc}") from exc
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


_URL_OPTIONS = {"db", "ssl_cert_reqs", "ssl_ca_certs"}


def check_url(url: str) -> None:
    """Raises ValueError naming what is wrong with a store URL (after the store's own options):
    redis://[[user]:password@]host[:port][/db], rediss://... (TLS), unix:///path?db=N."""
    from urllib.parse import parse_qsl, urlsplit

    from redis.asyncio.connection import parse_url

    parts = urlsplit(url)
    unknown = sorted({k for k, _ in parse_qsl(parts.query)} - _URL_OPTIONS)
    if unknown:
        raise ValueError(f"unsupported Redis URL option(s): {', '.join(unknown)}")
    db = parts.path.strip("/") if parts.scheme != "unix" else ""
    if db and not db.isdigit():
        raise ValueError(f"Redis database must be a number, got {db!r}")
    parse_url(url)
