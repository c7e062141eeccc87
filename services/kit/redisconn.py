"""Redis URLs and clients as every service's Redis store takes them.

A store URL names one Redis (`redis://host:6379/0`) or, with `?cluster=true`, one node of a Redis
Cluster to start from (the client finds the others, follows MOVED/ASK and rediscovers the
cluster after a failover). `?key_prefix=p` prefixes every key. Both options are the stores',
not redis-py's: `split_key_prefix` and `cluster_option` take them off before the URL is opened.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

# After a Redis restart every idle connection in a pool is dead, and a call that draws one fails
# with ConnectionError before Redis saw it. Such a call is made once more on a new connection.
# Only ConnectionError, and only once: a timeout is never retried (the command may still run),
# and a connection cut while Redis was answering can repeat one command, which the stores'
# writes tolerate (idempotency keys, write-once job ends, replaced cache entries).
# What a store call raises when Redis cannot answer: redis-py's errors, a cluster client's errors
# that are not RedisErrors (no node reachable, a slot no node serves), and socket errors.
REDIS_FAILURES: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)

_RECONNECT_ONCE = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def split_key_prefix(url: str) -> tuple[str, str]:
    """The URL without its `key_prefix` query parameter, and the prefix (every key carries it)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = "".join(v for k, v in query if k == "key_prefix")
    rest = urlencode([(k, v) for k, v in query if k != "key_prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


def pooled_client(url: str, *, pool_size: int, timeout: float) -> aioredis.Redis:
    """A client on a blocking pool of `pool_size` connections: past them a call waits (up to
    `timeout`) for a connection to come back instead of failing with "Too many connections",
    as redis-py's default pool does. Every call and connect is bounded by `timeout` too. The
    client owns its pool: closing it closes the connections. A call that draws a connection a
    Redis restart left dead is made again on a new one (`_RECONNECT_ONCE`)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=_RECONNECT_ONCE,
    )
    return aioredis.Redis.from_pool(pool)


def cluster_option(url: str) -> tuple[str, bool]:
    """The URL without the stores' `cluster` option, and whether it names a Redis Cluster
    (`?cluster=true`: the URL is one node to start from, the client finds the others)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    flags = [v.lower() for k, v in query if k == "cluster"]
    if any(f not in ("true", "false", "1", "0", "yes", "no") for f in flags):
        raise ValueError(f"cluster must be true or false, got {flags[0]!r}")
    cluster = bool(flags) and flags[-1] in ("true", "1", "yes")
    if cluster and parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has database 0 only, got {parts.path.strip('/')!r}")
    rest = urlencode([(k, v) for k, v in query if k != "cluster"])
    return urlunsplit(parts._replace(query=rest)), cluster


def open_client(url: str, *, pool_size: int, timeout: float) -> tuple[Any, bool]:
    """A client for a store URL (after `split_key_prefix`), and whether it is a cluster client.

    One node: `pooled_client`. A Redis Cluster (`?cluster=true`): `redis.asyncio.RedisCluster`,
    `pool_size` connections per node, every call bounded by `timeout`. A store whose every call
    names keys of one hash tag then talks to one shard per call. (Typed Any: redis-py's stubs
    type replies as unions of every shape, and the two clients share the commands stores use.)"""
    clean, cluster = cluster_option(url)
    if not cluster:
        return pooled_client(clean, pool_size=pool_size, timeout=timeout), False
    client = aioredis.RedisCluster.from_url(
        clean,
        max_connections=pool_size,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    return client, True
