"""The stores' shared Redis client against a private redis-server that is killed and restarted."""

from __future__ import annotations

import asyncio

import pytest

from services.kit.redisconn import cluster_option, pooled_client, split_key_prefix
from tests.support.backends import private_redis


def test_the_key_prefix_leaves_the_url() -> None:
    assert split_key_prefix("redis://h:6379/2?key_prefix=t1:&ssl_cert_reqs=none") == (
        "redis://h:6379/2?ssl_cert_reqs=none",
        "t1:",
    )
    assert split_key_prefix("redis://h/0") == ("redis://h/0", "")


async def test_calls_on_connections_a_restart_left_dead_are_made_again_once_each() -> None:
    with private_redis() as server:
        client = pooled_client(server.url, pool_size=8, timeout=2.0)
        try:
            await asyncio.gather(*(client.ping() for _ in range(8)))  # eight pooled connections
            server.stop(kill=True)
            server.start()
            counts = await asyncio.gather(*(client.incr("n") for _ in range(8)))
            assert sorted(counts) == list(range(1, 9))
            assert await client.get("n") == b"8"
        finally:
            await client.aclose()


def test_the_cluster_option_leaves_the_url() -> None:
    assert cluster_option("redis://h:6379/0?cluster=true&ssl_cert_reqs=none") == (
        "redis://h:6379/0?ssl_cert_reqs=none",
        True,
    )
    assert cluster_option("redis://h:6379/3") == ("redis://h:6379/3", False)
    assert cluster_option("redis://h?cluster=no") == ("redis://h", False)
    with pytest.raises(ValueError, match="cluster must be true or false, got 'sometimes'"):
        cluster_option("redis://h?cluster=sometimes")
    with pytest.raises(ValueError, match="database 0 only, got '3'"):
        cluster_option("redis://h:6379/3?cluster=true")
