"""The private-backend helpers really stop and restart their servers (and keep data when asked)."""

from __future__ import annotations

import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.support.backends import private_postgres, private_redis


async def test_private_redis_survives_a_restart_when_durable() -> None:
    with private_redis(durable=True) as server:
        client = aioredis.from_url(server.url)
        await client.set("k", "v")
        await client.aclose()
        server.stop(kill=True)
        client = aioredis.from_url(server.url, socket_connect_timeout=0.5)
        with pytest.raises(Exception):  # noqa: B017 - any connection error will do
            await client.ping()
        await client.aclose()
        server.start()
        client = aioredis.from_url(server.url)
        assert await client.get("k") == b"v"
        await client.aclose()


async def test_private_postgres_restarts_with_its_data() -> None:
    with private_postgres() as server:
        conn = await asyncpg.connect(server.dsn)
        await conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        await conn.close()
        server.stop(mode="immediate")
        with pytest.raises((OSError, asyncpg.PostgresError)):
            await asyncpg.connect(server.dsn, timeout=2)
        server.start()
        conn = await asyncpg.connect(server.dsn)
        assert await conn.fetchval("SELECT x FROM t") == 1
        await conn.close()
