"""The per-test PostgreSQL schema is dropped even when the test left a transaction holding its
locks in a loop that will never run again (a service still up in the test's suspended loop)."""

from __future__ import annotations

import asyncio

import asyncpg


def test_a_schema_whose_locks_a_stranded_transaction_holds_is_still_dropped(postgres_dsn: str) -> None:
    async def strand() -> asyncpg.Connection:
        conn = await asyncpg.connect(postgres_dsn)
        await conn.execute("CREATE TABLE held (x int)")
        await conn.transaction().start()
        await conn.execute("LOCK TABLE held IN ACCESS EXCLUSIVE MODE")
        return conn

    # The loop is left open and never run again: the connection stays idle in its transaction.
    # Without ending it, the fixture's DROP SCHEMA waits for ever and the test times out.
    stranded_loop = asyncio.new_event_loop()
    stranded_loop.run_until_complete(strand())
