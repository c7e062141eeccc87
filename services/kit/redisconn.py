"""Redis URLs and clients as every service's Redis store takes them."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis


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
    client owns its pool: closing it closes the connections."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    return aioredis.Redis.from_pool(pool)
