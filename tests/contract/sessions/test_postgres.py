"""PostgreSQL specifics: migrations, the read replica DSN, storage growth and the sweep."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from ballast.sessions.v1 import sessions_pb2
from google.protobuf import duration_pb2

from services.kit.config import Env
from services.sessions.app import SessionsApp
from services.sessions.config import SessionsSettings
from services.sessions.model import NewTurn, Scope, SessionRecord
from services.sessions.store import SessionStore
from services.sessions.store.memory import MemoryStore
from services.sessions.store.postgres import MIGRATIONS, PostgresStore
from tests.conftest import SuiteFactory
from tests.contract.sessions.helpers import caller, user_turn
from tests.support.backends import free_port
from tests.support.waiting import eventually


def _settings(url: str, **overrides: object) -> SessionsSettings:
    env = Env({"BALLAST_SESSIONS_STORE": url})
    settings = SessionsSettings.from_env(env)
    env.check()
    return dataclasses.replace(settings, **overrides)  # type: ignore[arg-type]


def _schema(dsn: str) -> str:
    return parse_qs(urlsplit(dsn).query)["search_path"][0]


async def test_replicas_starting_together_apply_each_migration_once(postgres_dsn: str) -> None:
    stores = [PostgresStore(_settings(postgres_dsn, pool_min_size=1)) for _ in range(4)]
    await asyncio.gather(*(store.start() for store in stores))
    conn = await asyncpg.connect(postgres_dsn)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == [v for v, _, _ in MIGRATIONS]
    finally:
        await conn.close()
    for store in stores:
        await store.close()
    again = PostgresStore(_settings(postgres_dsn, pool_min_size=1))
    await again.start()  # nothing left to apply, no error
    await again.close()


async def test_listing_reads_the_replica_and_context_the_primary(
    suite_factory: SuiteFactory, postgres_dsn: str
) -> None:
    # A "replica" that never receives the primary's writes (another schema) shows which pool is read.
    conn = await asyncpg.connect(postgres_dsn)
    lagging = _schema(postgres_dsn) + "_replica"
    await conn.execute(f'CREATE SCHEMA "{lagging}"')
    try:
        replica_dsn = postgres_dsn.replace(_schema(postgres_dsn), lagging)
        replica = PostgresStore(_settings(replica_dsn, pool_min_size=1))
        await replica.start()
        await replica.close()
        suite = await suite_factory(
            ["sessions"],
            {
                "BALLAST_SESSIONS_STORE": postgres_dsn,
                "BALLAST_SESSIONS_READ_STORE": replica_dsn,
                "BALLAST_SESSIONS_COMPACTION": "false",
            },
        )
        stub = suite.sessions
        await stub.CreateSession(sessions_pb2.CreateSessionRequest(caller=caller(), session_id="s1"))
        await stub.AppendTurns(
            sessions_pb2.AppendTurnsRequest(
                caller=caller(), session_id="s1", expected_version=0, turns=[user_turn("hi")]
            )
        )
        ctx = await stub.GetContext(
            sessions_pb2.GetContextRequest(caller=caller(), session_id="s1", token_budget=100)
        )
        assert [t.message.content for t in ctx.turns] == ["hi"]
        got = await stub.GetSession(sessions_pb2.GetSessionRequest(caller=caller(), session_id="s1"))
        assert got.session.version == 1
        listed = await stub.ListSessions(sessions_pb2.ListSessionsRequest(caller=caller()))
        assert list(listed.sessions) == []  # the replica has not caught up
    finally:
        await conn.execute(f'DROP SCHEMA "{lagging}" CASCADE')
        await conn.close()


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[SessionStore]:
    chosen: SessionStore = (
        MemoryStore()
        if store_url.startswith("memory")
        else PostgresStore(_settings(store_url, pool_min_size=1))
    )
    await chosen.start()
    yield chosen
    await chosen.close()


def _record(sid: str, now: float, ttl: float) -> SessionRecord:
    return SessionRecord(sid, "t", "u", "", {}, now, now, now + ttl, ttl)


async def test_sweep_purges_expired_sessions_and_old_keys(store: SessionStore) -> None:
    scope = Scope("t", "u")
    now = 1_800_000_000.0
    await store.create(_record("old", now, 10))
    await store.create(_record("live", now, 1000))
    turn = NewTurn(2, 5, 0, 0, 0, 0, b"")
    await store.append(scope, "live", -1, "key-1", [turn], now + 1)
    assert await store.sweep(now + 20, 100, now) == 1
    assert await store.get(scope, "old", now) is None  # purged, not only hidden
    live = await store.get(scope, "live", now + 20)
    assert live is not None and live.version == 1
    # The idempotency key outlived its retention: the same key appends again.
    assert await store.sweep(now + 30, 100, now + 2) == 0
    again = await store.append(scope, "live", -1, "key-1", [turn], now + 31)
    assert not again.replayed and again.session.version == 2


async def test_an_append_stores_the_same_bytes_at_turn_300_as_at_turn_1(postgres_dsn: str) -> None:
    store = PostgresStore(_settings(postgres_dsn, pool_min_size=1))
    await store.start()
    scope = Scope("t", "u")
    now = 1_800_000_000.0
    await store.create(_record("s", now, 1e6))
    turn = NewTurn(2, 50, 0, 0, 0, 0, b"x" * 200)
    conn = await asyncpg.connect(postgres_dsn)
    # What the appends write, not what a background vacuum does: once a slow (busy) run lasts
    # long enough for autovacuum to reach these tables, it adds free-space and visibility maps
    # (four pages) or truncates, between one measurement and the next.
    for table in ("sessions", "turns", "idempotency"):
        await conn.execute(
            f"ALTER TABLE {table} SET (autovacuum_enabled = false, toast.autovacuum_enabled = false)"
        )
    # The main fork of each table, its indexes and its TOAST table.
    size_sql = """
        SELECT sum(pg_relation_size(c.oid)) FROM pg_class c
         WHERE c.oid IN (SELECT t::regclass FROM unnest(ARRAY['sessions', 'turns', 'idempotency']) t)
            OR c.oid IN (SELECT indexrelid FROM pg_index
                          WHERE indrelid IN ('sessions'::regclass, 'turns'::regclass, 'idempotency'::regclass))
            OR c.oid IN (SELECT reltoastrelid FROM pg_class
                          WHERE oid IN ('sessions'::regclass, 'turns'::regclass, 'idempotency'::regclass))"""

    async def stored(count: int, tag: str) -> int:
        """Bytes the tables of this schema grow by over `count` appends."""
        before = int(await conn.fetchval(size_sql))
        for i in range(count):
            await store.append(scope, "s", -1, f"{tag}-{i}", [turn], now + 1)
        return int(await conn.fetchval(size_sql)) - before

    try:
        early = await stored(100, "early")
        for _ in range(100):
            await store.append(scope, "s", -1, "", [turn], now + 1)
        late = await stored(100, "late")
        # Pages are 8 KiB, hence the slack of two; a store that rewrote the conversation on each
        # append would grow by megabytes here.
        assert late <= early + 2 * 8192, (early, late)
        assert early < 100 * 1500
    finally:
        await conn.close()
        await store.close()


async def _gone(app: SessionsApp, scope: Scope, then: float) -> bool:
    return await app.store.get(scope, "brief", then) is None


async def test_the_background_sweep_purges_expired_sessions(
    suite_factory: SuiteFactory, store_url: str
) -> None:
    suite = await suite_factory(
        ["sessions"],
        {
            "BALLAST_SESSIONS_STORE": store_url,
            "BALLAST_SESSIONS_COMPACTION": "false",
            "BALLAST_SESSIONS_SWEEP_INTERVAL": "50ms",
        },
    )
    app = suite.running["sessions"].app
    assert isinstance(app, SessionsApp)
    created = await suite.sessions.CreateSession(
        sessions_pb2.CreateSessionRequest(
            caller=caller(), session_id="brief", ttl=duration_pb2.Duration(seconds=3600)
        )
    )
    await suite.sessions.AppendTurns(
        sessions_pb2.AppendTurnsRequest(
            caller=caller(), session_id="brief", turns=[user_turn("x")], expected_version=-1
        )
    )
    # The service's clock moves two hours on, past the TTL: the sweeper finds the session expired
    # (a TTL short enough to pass in real time would race the append on a slow machine).
    real_clock = app.sessions.clock
    app.sessions.clock = lambda: real_clock() + 7200
    # Asked "as of creation time", the store still has the session until the sweep removes it.
    then = created.session.created_at.ToNanoseconds() / 1e9
    scope = Scope("t1", "u1")
    assert await app.store.get(scope, "brief", then) is not None
    await eventually(lambda: _gone(app, scope, then), what="the sweep purged the expired session")


async def test_an_older_schema_is_upgraded_in_place(postgres_dsn: str) -> None:
    """A database left at migration 2 by an older release keeps its data and its keys replay."""
    conn = await asyncpg.connect(postgres_dsn)
    try:
        async with conn.transaction():
            await conn.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for version, name, sql in MIGRATIONS[:2]:
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2)", version, name)
        now = datetime.now(UTC)
        await conn.execute(
            "INSERT INTO sessions (tenant_id, user_id, session_id, ttl_seconds, created_at, updated_at, expires_at)"
            " VALUES ('t', 'u', 'old', 3600, $1::timestamptz, $1::timestamptz, $1::timestamptz + interval '1 hour')",
            now,
        )
        status = await conn.fetchval(
            "SELECT o_status FROM sessions_append('t', 'u', 'old', -1, 'k-old', $1, '{2}', '{5}', '{0}',"
            " ARRAY['\\x0a00'::bytea], 0, 0, 0, 0, 5)",
            now,
        )
        assert status == "applied"
    finally:
        await conn.close()
    store = PostgresStore(_settings(postgres_dsn, pool_min_size=1))
    await store.start()
    try:
        scope = Scope("t", "u")
        turn = NewTurn(2, 5, 0, 0, 0, 0, b"\x0a\x00")
        replay = await store.append(scope, "old", -1, "k-old", [turn], now.timestamp(), request_hash=b"h1")
        assert replay.replayed and replay.session.version == 1
        fresh = await store.append(scope, "old", 1, "k-new", [turn], now.timestamp(), request_hash=b"h2")
        assert not fresh.replayed and fresh.session.version == 2 and fresh.turns[0].seq == 2
    finally:
        await store.close()


async def test_listing_falls_back_to_the_primary_when_the_replica_is_down(
    suite_factory: SuiteFactory, postgres_dsn: str
) -> None:
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    suite = await suite_factory(
        ["sessions"],
        {
            "BALLAST_SESSIONS_STORE": postgres_dsn,
            "BALLAST_SESSIONS_READ_STORE": down,
            "BALLAST_SESSIONS_COMPACTION": "false",
            "BALLAST_SESSIONS_CONNECT_TIMEOUT": "500ms",
        },
    )
    await suite.sessions.CreateSession(sessions_pb2.CreateSessionRequest(caller=caller(), session_id="s1"))
    listed = await suite.sessions.ListSessions(sessions_pb2.ListSessionsRequest(caller=caller()), timeout=5)
    assert [s.session_id for s in listed.sessions] == ["s1"]
    turns = await suite.sessions.ListTurns(
        sessions_pb2.ListTurnsRequest(caller=caller(), session_id="s1"), timeout=5
    )
    assert list(turns.turns) == []
