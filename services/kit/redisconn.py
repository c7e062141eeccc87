"""Redis URLs and clients as every service's Redis store takes them."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

# After a Redis restart every idle connection in a pool is dead, and a call that draws one fails
# with ConnectionError before Redis saw it. Such a call is made once more on a new connection.
# Only ConnectionError, and only once: a timeout is never retried (the command may still run),
# and a connection cut while Redis was answering can repeat one command, which the stores'
# writes tolerate (idempotency keys, write-once job ends, replaced cache entries).
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
