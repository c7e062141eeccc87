"""PostgreSQL store (asyncpg): a sessions row, turns keyed (sid, seq), an idempotency table.

An append is one round trip to a server-side function that, in one transaction, locks
the session row, replays a known idempotency key, checks the expected version, inserts
only the new turns and bumps the session row: its cost and the bytes it writes do not
depend on how long the session already is. Statements are prepared once per pooled
connection (asyncpg's statement cache). Schema migrations are versioned in
`schema_migrations` and applied at start-up under an advisory lock, so replicas that
start together apply each one exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg

from services.kit.errors import (
    Aborted,
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.sessions.config import SessionsSettings
from services.sessions.model import (
    KEY_REUSED as _KEY_REUSED,
)
from services.sessions.model import (
    AppendOutcome,
    Counters,
    NewTurn,
    Scope,
    SessionRecord,
    StoredTurn,
    too_many_sessions,
)

log = logging.getLogger("ballast.sessions.postgres")
T = TypeVar("T")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# The append function of migrations 3 and 4, which differ only in how it is created and in
# keeping expires_hour current. A shipped migration never changes: an edit here must leave both
# texts as they were (a fresh database runs every migration in order).
_SESSIONS_APPEND = """{create} sessions_append(
            p_tenant text, p_user text, p_session text, p_expected bigint, p_key text,
            p_now timestamptz, p_roles smallint[], p_tokens integer[], p_tool_calls integer[],
            p_payloads bytea[], p_sum_tool_calls bigint, p_sum_input bigint, p_sum_output bigint,
            p_sum_cost bigint, p_sum_tokens bigint, p_hash bytea)
        RETURNS TABLE (o_status text, o_first bigint, o_last bigint, o_row sessions)
        LANGUAGE plpgsql AS $$
        #variable_conflict use_column
        DECLARE
            v sessions%ROWTYPE;
            idem idempotency%ROWTYPE;
            n integer := coalesce(array_length(p_roles, 1), 0);
        BEGIN
            SELECT * INTO v FROM sessions
             WHERE tenant_id = p_tenant AND user_id = p_user AND session_id = p_session
               AND expires_at > p_now
               FOR UPDATE;
            IF NOT FOUND THEN
                RETURN QUERY SELECT 'not_found'::text, 0::bigint, 0::bigint, NULL::sessions;
                RETURN;
            END IF;
            IF p_key <> '' THEN
                SELECT * INTO idem FROM idempotency WHERE sid = v.sid AND key = p_key;
                IF FOUND AND idem.request_hash <> p_hash AND idem.request_hash <> ''::bytea THEN
                    RETURN QUERY SELECT 'mismatch'::text, 0::bigint, 0::bigint, NULL::sessions;
                    RETURN;
                END IF;
                IF FOUND THEN
                    v.version := idem.version; v.turns := idem.turns; v.tool_calls := idem.tool_calls;
                    v.input_tokens := idem.input_tokens; v.output_tokens := idem.output_tokens;
                    v.cost_micros := idem.cost_micros; v.total_tokens := idem.total_tokens;
                    v.updated_at := idem.updated_at; v.expires_at := idem.expires_at;
                    RETURN QUERY SELECT 'replayed'::text, idem.first_seq, idem.last_seq, v;
                    RETURN;
                END IF;
            END IF;
            IF p_expected <> -1 AND p_expected <> v.version THEN
                RETURN QUERY SELECT 'conflict'::text, 0::bigint, 0::bigint, v;
                RETURN;
            END IF;
            INSERT INTO turns (sid, seq, role, token_count, tool_calls, payload, created_at)
            SELECT v.sid, v.turns + i, p_roles[i], p_tokens[i], p_tool_calls[i], p_payloads[i], p_now
              FROM generate_subscripts(p_roles, 1) AS i;
            UPDATE sessions
               SET version = version + 1,
                   turns = turns + n,
                   tool_calls = tool_calls + p_sum_tool_calls,
                   input_tokens = input_tokens + p_sum_input,
                   output_tokens = output_tokens + p_sum_output,
                   cost_micros = cost_micros + p_sum_cost,
                   total_tokens = total_tokens + p_sum_tokens,
                   updated_at = p_now,
                   expires_at = p_now + make_interval(secs => ttl_seconds){expires_hour}
             WHERE sid = v.sid
            RETURNING * INTO v;
            IF p_key <> '' THEN
                INSERT INTO idempotency (sid, key, first_seq, last_seq, version, turns, tool_calls,
                                         input_tokens, output_tokens, cost_micros, total_tokens,
                                         updated_at, expires_at, request_hash)
                VALUES (v.sid, p_key, v.turns - n + 1, v.turns, v.version, v.turns, v.tool_calls,
                        v.input_tokens, v.output_tokens, v.cost_micros, v.total_tokens,
                        v.updated_at, v.expires_at, p_hash);
            END IF;
            RETURN QUERY SELECT 'applied'::text, v.turns - n + 1, v.turns, v;
        END
        $$;
        """


def _sessions_append(create: str, *, expires_hour: bool) -> str:
    """sessions_append as migrations 3 and 4 define it: one round-trip append, idempotency keys
    that remember their request; from 4 on it also keeps the indexed expires_hour current."""
    return _SESSIONS_APPEND.format(
        create=create,
        expires_hour=(
            ",\n                   expires_hour = floor(extract(epoch FROM p_now) + ttl_seconds)::bigint / 3600"
            if expires_hour
            else ""
        ),
    )


MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "sessions, turns and idempotency tables",
        """
        CREATE TABLE sessions (
            sid bigserial PRIMARY KEY,
            tenant_id text NOT NULL,
            user_id text NOT NULL,
            session_id text NOT NULL,
            title text NOT NULL DEFAULT '',
            metadata jsonb NOT NULL DEFAULT '{}',
            version bigint NOT NULL DEFAULT 0,
            turns bigint NOT NULL DEFAULT 0,
            tool_calls bigint NOT NULL DEFAULT 0,
            input_tokens bigint NOT NULL DEFAULT 0,
            output_tokens bigint NOT NULL DEFAULT 0,
            cost_micros bigint NOT NULL DEFAULT 0,
            total_tokens bigint NOT NULL DEFAULT 0,
            summary text NOT NULL DEFAULT '',
            summary_tokens bigint NOT NULL DEFAULT 0,
            summarized_seq bigint NOT NULL DEFAULT 0,
            summarized_tokens bigint NOT NULL DEFAULT 0,
            ttl_seconds double precision NOT NULL,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            expires_at timestamptz NOT NULL,
            UNIQUE (tenant_id, user_id, session_id)
        );
        CREATE INDEX sessions_by_user ON sessions (tenant_id, user_id, updated_at DESC, session_id DESC);
        CREATE INDEX sessions_by_expiry ON sessions (expires_at);
        CREATE TABLE turns (
            sid bigint NOT NULL REFERENCES sessions (sid) ON DELETE CASCADE,
            seq bigint NOT NULL,
            role smallint NOT NULL,
            token_count integer NOT NULL,
            tool_calls integer NOT NULL,
            payload bytea NOT NULL,
            created_at timestamptz NOT NULL,
            PRIMARY KEY (sid, seq)
        );
        CREATE TABLE idempotency (
            sid bigint NOT NULL REFERENCES sessions (sid) ON DELETE CASCADE,
            key text NOT NULL,
            first_seq bigint NOT NULL,
            last_seq bigint NOT NULL,
            version bigint NOT NULL,
            turns bigint NOT NULL,
            tool_calls bigint NOT NULL,
            input_tokens bigint NOT NULL,
            output_tokens bigint NOT NULL,
            cost_micros bigint NOT NULL,
            total_tokens bigint NOT NULL,
            updated_at timestamptz NOT NULL,
            expires_at timestamptz NOT NULL,
            PRIMARY KEY (sid, key)
        );
        CREATE INDEX idempotency_by_age ON idempotency (updated_at);
        """,
    ),
    (
        2,
        "sessions_append: one-round-trip append",
        """
        CREATE FUNCTION sessions_append(
            p_tenant text, p_user text, p_session text, p_expected bigint, p_key text,
            p_now timestamptz, p_roles smallint[], p_tokens integer[], p_tool_calls integer[],
            p_payloads bytea[], p_sum_tool_calls bigint, p_sum_input bigint, p_sum_output bigint,
            p_sum_cost bigint, p_sum_tokens bigint)
        RETURNS TABLE (o_status text, o_first bigint, o_last bigint, o_row sessions)
        LANGUAGE plpgsql AS $$
        #variable_conflict use_column
        DECLARE
            v sessions%ROWTYPE;
            idem idempotency%ROWTYPE;
            n integer := coalesce(array_length(p_roles, 1), 0);
        BEGIN
            SELECT * INTO v FROM sessions
             WHERE tenant_id = p_tenant AND user_id = p_user AND session_id = p_session
               AND expires_at > p_now
               FOR UPDATE;
            IF NOT FOUND THEN
                RETURN QUERY SELECT 'not_found'::text, 0::bigint, 0::bigint, NULL::sessions;
                RETURN;
            END IF;
            IF p_key <> '' THEN
                SELECT * INTO idem FROM idempotency WHERE sid = v.sid AND key = p_key;
                IF FOUND THEN
                    v.version := idem.version; v.turns := idem.turns; v.tool_calls := idem.tool_calls;
                    v.input_tokens := idem.input_tokens; v.output_tokens := idem.output_tokens;
                    v.cost_micros := idem.cost_micros; v.total_tokens := idem.total_tokens;
                    v.updated_at := idem.updated_at; v.expires_at := idem.expires_at;
                    RETURN QUERY SELECT 'replayed'::text, idem.first_seq, idem.last_seq, v;
                    RETURN;
                END IF;
            END IF;
            IF p_expected <> -1 AND p_expected <> v.version THEN
                RETURN QUERY SELECT 'conflict'::text, 0::bigint, 0::bigint, v;
                RETURN;
            END IF;
            INSERT INTO turns (sid, seq, role, token_count, tool_calls, payload, created_at)
            SELECT v.sid, v.turns + i, p_roles[i], p_tokens[i], p_tool_calls[i], p_payloads[i], p_now
              FROM generate_subscripts(p_roles, 1) AS i;
            UPDATE sessions
               SET version = version + 1,
                   turns = turns + n,
                   tool_calls = tool_calls + p_sum_tool_calls,
                   input_tokens = input_tokens + p_sum_input,
                   output_tokens = output_tokens + p_sum_output,
                   cost_micros = cost_micros + p_sum_cost,
                   total_tokens = total_tokens + p_sum_tokens,
                   updated_at = p_now,
                   expires_at = p_now + make_interval(secs => ttl_seconds)
             WHERE sid = v.sid
            RETURNING * INTO v;
            IF p_key <> '' THEN
                INSERT INTO idempotency (sid, key, first_seq, last_seq, version, turns, tool_calls,
                                         input_tokens, output_tokens, cost_micros, total_tokens,
                                         updated_at, expires_at)
                VALUES (v.sid, p_key, v.turns - n + 1, v.turns, v.version, v.turns, v.tool_calls,
                        v.input_tokens, v.output_tokens, v.cost_micros, v.total_tokens,
                        v.updated_at, v.expires_at);
            END IF;
            RETURN QUERY SELECT 'applied'::text, v.turns - n + 1, v.turns, v;
        END
        $$;
        """,
    ),
    (
        3,
        "idempotency keys remember what they applied: a reused key with other turns is refused",
        """
        ALTER TABLE idempotency ADD COLUMN request_hash bytea NOT NULL DEFAULT ''::bytea;
        DROP FUNCTION sessions_append(text, text, text, bigint, text, timestamptz, smallint[], integer[],
                                      integer[], bytea[], bigint, bigint, bigint, bigint, bigint);
        """
        + _sessions_append("CREATE FUNCTION", expires_hour=False),
    ),
    (
        4,
        "HOT appends: the session row an append updates has no index on a column it changes",
        """
        DROP INDEX sessions_by_user;
        DROP INDEX sessions_by_expiry;
        ALTER TABLE sessions ADD COLUMN expires_hour bigint;
        UPDATE sessions SET expires_hour = floor(extract(epoch FROM expires_at))::bigint / 3600;
        ALTER TABLE sessions ALTER COLUMN expires_hour SET NOT NULL;
        CREATE INDEX sessions_by_expiry_hour ON sessions (expires_hour);
        ALTER TABLE sessions SET (fillfactor = 70);
        """
        + _sessions_append("CREATE OR REPLACE FUNCTION", expires_hour=True),
    ),
]

_MIGRATION_LOCK = (
    "SELECT pg_advisory_xact_lock(hashtext(coalesce(current_schema(), '') || ':ballast.sessions'))"
)

# Seqs of a session are contiguous from 1 (turns are never removed one by one), so every turn
# query states its seq range exactly: it reads as many rows as it returns whatever plan the
# planner picks, and does not slow down as a session grows.
_SESSION_COLUMNS = (
    "sid, tenant_id, user_id, session_id, title, metadata, version, turns, tool_calls, input_tokens,"
    " output_tokens, cost_micros, total_tokens, summary, summary_tokens, summarized_seq,"
    " summarized_tokens, ttl_seconds, created_at, updated_at, expires_at"
)
_TURN_COLUMNS = "seq, role, token_count, tool_calls, payload, created_at"

_SQL_GET = f"""
SELECT {_SESSION_COLUMNS} FROM sessions
 WHERE tenant_id = $1 AND user_id = $2 AND session_id = $3 AND expires_at > $4"""
_SQL_LIST = f"""
SELECT {_SESSION_COLUMNS} FROM sessions
 WHERE tenant_id = $1 AND user_id = $2 AND expires_at > $3
   AND ($4::timestamptz IS NULL OR (updated_at, session_id) < ($4, $5))
 ORDER BY updated_at DESC, session_id DESC LIMIT $6"""
_SQL_TURNS = f"""
SELECT {_TURN_COLUMNS} FROM turns
 WHERE sid = (SELECT sid FROM sessions
               WHERE tenant_id = $1 AND user_id = $2 AND session_id = $3 AND expires_at > $4)
   AND seq > $5 AND seq <= $5 + $6 ORDER BY seq LIMIT $6"""
_SQL_TAIL = f"""
SELECT s.sid, s.tenant_id, s.user_id, s.session_id, s.title, s.metadata, s.version, s.turns,
       s.tool_calls, s.input_tokens, s.output_tokens, s.cost_micros, s.total_tokens, s.summary,
       s.summary_tokens, s.summarized_seq, s.summarized_tokens, s.ttl_seconds, s.created_at,
       s.updated_at, s.expires_at, t.seq AS t_seq, t.role AS t_role, t.token_count AS t_token_count,
       t.tool_calls AS t_tool_calls, t.payload AS t_payload, t.created_at AS t_created_at
  FROM sessions s
  LEFT JOIN LATERAL (
       SELECT {_TURN_COLUMNS} FROM turns
        WHERE turns.sid = s.sid AND turns.seq > greatest(s.summarized_seq, s.turns - $5)
        ORDER BY turns.seq DESC LIMIT $5) t ON true
 WHERE s.tenant_id = $1 AND s.user_id = $2 AND s.session_id = $3 AND s.expires_at > $4
 ORDER BY t.seq DESC"""
_SQL_BEFORE = f"""
SELECT {_TURN_COLUMNS} FROM turns WHERE sid = $1 AND seq > greatest($2, $3 - 1 - $4) AND seq < $3
 ORDER BY seq DESC LIMIT $4"""
_SQL_APPEND = (
    "SELECT o_status, o_first, o_last, o_row"
    " FROM sessions_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
)
_SQL_RANGE = f"SELECT {_TURN_COLUMNS} FROM turns WHERE sid = $1 AND seq BETWEEN $2 AND $3 ORDER BY seq"
_SQL_CREATE = """
INSERT INTO sessions (tenant_id, user_id, session_id, title, metadata, ttl_seconds, created_at,
                      updated_at, expires_at, expires_hour)
VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $7, $8, $9)
RETURNING sid"""
# A session that expired but was not swept yet still holds its id: free it first.
_SQL_DROP_EXPIRED = """
DELETE FROM sessions WHERE tenant_id = $1 AND user_id = $2 AND session_id = $3 AND expires_at <= $4"""
_SQL_USER_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || $2, 7))"
# Counts no further than the cap: the cost of the check does not grow past it.
_SQL_COUNT_LIVE = """
SELECT count(*) FROM (SELECT 1 FROM sessions
 WHERE tenant_id = $1 AND user_id = $2 AND expires_at > $3 LIMIT $4) AS live"""
_SQL_DELETE = """
DELETE FROM sessions WHERE tenant_id = $1 AND user_id = $2 AND session_id = $3 AND expires_at > $4"""
_SQL_DELETE_USER = "DELETE FROM sessions WHERE tenant_id = $1 AND user_id = $2"
_SQL_SAVE_SUMMARY = """
UPDATE sessions SET summary = $3, summary_tokens = $4, summarized_seq = $5, summarized_tokens = $6
 WHERE sid = $1 AND summarized_seq = $2"""
# expires_hour (indexed, changes at most hourly) finds candidates; expires_at decides.
_SQL_SWEEP = """
DELETE FROM sessions WHERE sid IN (
    SELECT sid FROM sessions WHERE expires_hour <= $3 AND expires_at <= $1 LIMIT $2)"""
_SQL_SWEEP_KEYS = """
DELETE FROM idempotency WHERE ctid IN (
    SELECT ctid FROM idempotency WHERE updated_at < $1 LIMIT $2)"""

# Errors that mean "the database cannot be reached right now": retryable UNAVAILABLE.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    # "cannot switch to state ...; another operation is in progress": a connection broken by a
    # server restart or a timed-out command, seen on its next use.
    asyncpg.exceptions.InternalClientError,
)


def _ts(seconds: float) -> datetime:
    return _EPOCH + timedelta(microseconds=round(seconds * 1e6))


def _seconds(moment: datetime) -> float:
    return (moment - _EPOCH) / timedelta(microseconds=1) / 1e6


def _record(row: Any) -> SessionRecord:
    metadata = row["metadata"]
    return SessionRecord(
        session_id=row["session_id"],
        tenant_id=row["tenant_id"],
        user_id=row["user_id"],
        title=row["title"],
        metadata=json.loads(metadata) if isinstance(metadata, str) else dict(metadata),
        created_at=_seconds(row["created_at"]),
        updated_at=_seconds(row["updated_at"]),
        expires_at=_seconds(row["expires_at"]),
        ttl=row["ttl_seconds"],
        version=row["version"],
        counters=Counters(
            turns=row["turns"],
            tool_calls=row["tool_calls"],
            input_tokens=row["input_tokens"],
            output_tokens=row["output_tokens"],
            cost_micros=row["cost_micros"],
        ),
        summary=row["summary"],
        summary_tokens=row["summary_tokens"],
        summarized_seq=row["summarized_seq"],
        total_tokens=row["total_tokens"],
        summarized_tokens=row["summarized_tokens"],
        internal_id=row["sid"],
    )


def _turn(row: Any, prefix: str = "") -> StoredTurn:
    return StoredTurn(
        seq=row[f"{prefix}seq"],
        role=row[f"{prefix}role"],
        token_count=row[f"{prefix}token_count"],
        tool_calls=row[f"{prefix}tool_calls"],
        payload=bytes(row[f"{prefix}payload"]),
        created_at=_seconds(row[f"{prefix}created_at"]),
    )


async def _no_session_state(conn: asyncpg.Connection) -> None:
    """Replaces asyncpg's reset on release (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL),
    a round trip on every call: this store leaves no session state behind. Its advisory locks
    are transaction-scoped, it never LISTENs, opens cursors or SETs, and asyncpg still rolls
    back an unfinished transaction before calling this."""
    return None


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Applies the migrations this replica knows and the database lacks; returns them."""
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute(_MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in MIGRATIONS:
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            applied_now.append(version)
    return applied_now


class PostgresStore:
    def __init__(self, settings: SessionsSettings) -> None:
        self._settings = settings
        self._pool: asyncpg.Pool | None = None
        self._read_pool: asyncpg.Pool | None = None
        self._replica_warned = -1e9

    async def _open_pool(self, dsn: str, *, lazy: bool = False) -> asyncpg.Pool:
        s = self._settings
        pool: asyncpg.Pool = await asyncpg.create_pool(
            dsn,
            min_size=0 if lazy else min(s.pool_min_size, s.pool_max_size),
            max_size=s.pool_max_size,
            timeout=s.connect_timeout,
            command_timeout=s.command_timeout,
            reset=_no_session_state,
        )
        return pool

    async def start(self) -> None:
        self._pool = await self._open_pool(self._settings.store_url)
        async with self._pool.acquire() as conn:
            applied = await migrate(conn)
        if applied:
            log.info("schema migrations applied", extra={"versions": applied})
        if self._settings.read_store_url:
            # Connected on first use: a replica that is down does not stop the service.
            self._read_pool = await self._open_pool(self._settings.read_store_url, lazy=True)

    async def ping(self) -> None:
        # The primary: writes go there, so the service cannot answer without it.
        await self._attempt(self._pool, lambda conn: conn.fetchval("SELECT 1"))

    async def close(self) -> None:
        for pool in (self._read_pool, self._pool):
            if pool is None:
                continue
            try:
                await asyncio.wait_for(pool.close(), self._settings.command_timeout)
            except _UNAVAILABLE:
                pool.terminate()
        self._pool = self._read_pool = None

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[T]], *, replica: bool = False) -> T:
        if replica and self._read_pool is not None:
            try:
                return await self._attempt(self._read_pool, work)
            except Unavailable:
                # Reads that may lag may also come from the primary while the replica is away.
                now = time.monotonic()
                if now - self._replica_warned > 10.0:
                    self._replica_warned = now
                    log.warning("read replica unavailable; reading from the primary")
        return await self._attempt(self._pool, work)

    async def _attempt(
        self, pool: asyncpg.Pool | None, work: Callable[[asyncpg.Connection], Awaitable[T]]
    ) -> T:
        if pool is None:
            raise Unavailable("sessions store is not started")
        try:
            async with pool.acquire(timeout=self._settings.acquire_timeout) as conn:
                try:
                    return await work(conn)
                except _UNAVAILABLE:
                    # A connection that failed mid-call (server restart, timeout) may be left in a
                    # state asyncpg cannot reuse: close it, the pool opens a fresh one when needed.
                    conn.terminate()
                    raise
        except _UNAVAILABLE as exc:
            raise Unavailable(f"sessions database unavailable ({type(exc).__name__})") from exc

    async def create(self, record: SessionRecord, max_per_user: int = 0) -> SessionRecord:
        key = (record.tenant_id, record.user_id, record.session_id)
        values = (
            record.title,
            json.dumps(record.metadata),
            record.ttl,
            _ts(record.created_at),
            _ts(record.expires_at),
            int(record.expires_at) // 3600,
        )

        async def capped(conn: asyncpg.Connection) -> int:
            # Serialises creates of one user only, so two at once cannot both take the last slot.
            async with conn.transaction():
                await conn.execute(_SQL_USER_LOCK, record.tenant_id, record.user_id)
                await conn.execute(_SQL_DROP_EXPIRED, *key, _ts(record.created_at))
                try:
                    sid: int = await conn.fetchval(_SQL_CREATE, *key, *values)
                except asyncpg.UniqueViolationError as exc:
                    raise AlreadyExists(f"session {record.session_id!r} already exists") from exc
                # Counted with the new one; over the cap rolls the insert back.
                live = await conn.fetchval(
                    _SQL_COUNT_LIVE,
                    record.tenant_id,
                    record.user_id,
                    _ts(record.created_at),
                    max_per_user + 1,
                )
                if live > max_per_user:
                    raise ResourceExhausted(too_many_sessions(max_per_user), reason="SESSIONS_PER_USER")
                return sid

        async def work(conn: asyncpg.Connection) -> int:
            if max_per_user > 0:
                return await capped(conn)
            try:
                # One round trip in the common case: the id is free.
                sid: int = await conn.fetchval(_SQL_CREATE, *key, *values)
                return sid
            except asyncpg.UniqueViolationError:
                pass
            # Taken, perhaps by a session that expired but was not swept yet: free it and retry.
            async with conn.transaction():
                await conn.execute(_SQL_DROP_EXPIRED, *key, _ts(record.created_at))
                try:
                    sid = await conn.fetchval(_SQL_CREATE, *key, *values)
                except asyncpg.UniqueViolationError as exc:
                    raise AlreadyExists(f"session {record.session_id!r} already exists") from exc
                return sid

        sid = await self._run(work)
        record.internal_id = sid
        return record

    async def get(self, scope: Scope, session_id: str, now: float) -> SessionRecord | None:
        async def work(conn: asyncpg.Connection) -> SessionRecord | None:
            row = await conn.fetchrow(_SQL_GET, scope.tenant_id, scope.user_id, session_id, _ts(now))
            return None if row is None else _record(row)

        return await self._run(work)

    async def list_sessions(
        self, scope: Scope, now: float, limit: int, after: tuple[float, str] | None
    ) -> list[SessionRecord]:
        after_ts, after_id = (_ts(after[0]), after[1]) if after else (None, "")

        async def work(conn: asyncpg.Connection) -> list[SessionRecord]:
            rows = await conn.fetch(
                _SQL_LIST, scope.tenant_id, scope.user_id, _ts(now), after_ts, after_id, limit
            )
            return [_record(row) for row in rows]

        return await self._run(work, replica=True)

    async def delete(self, scope: Scope, session_id: str, now: float) -> bool:
        async def work(conn: asyncpg.Connection) -> bool:
            status = await conn.execute(_SQL_DELETE, scope.tenant_id, scope.user_id, session_id, _ts(now))
            return bool(status != "DELETE 0")

        return await self._run(work)

    async def delete_user(self, scope: Scope) -> int:
        async def work(conn: asyncpg.Connection) -> int:
            status = await conn.execute(_SQL_DELETE_USER, scope.tenant_id, scope.user_id)
            return int(status.split()[-1])

        return await self._run(work)

    async def append(
        self,
        scope: Scope,
        session_id: str,
        expected_version: int,
        idempotency_key: str,
        turns: Sequence[NewTurn],
        now: float,
        request_hash: bytes = b"",
    ) -> AppendOutcome:
        args = (
            scope.tenant_id,
            scope.user_id,
            session_id,
            expected_version,
            idempotency_key,
            _ts(now),
            [t.role for t in turns],
            [t.token_count for t in turns],
            [t.tool_calls for t in turns],
            [t.payload for t in turns],
            sum(t.tool_calls for t in turns),
            sum(t.input_tokens for t in turns),
            sum(t.output_tokens for t in turns),
            sum(t.cost_micros for t in turns),
            sum(t.token_count for t in turns),
            request_hash,
        )

        async def work(conn: asyncpg.Connection) -> AppendOutcome:
            row = await conn.fetchrow(_SQL_APPEND, *args)
            status = row["o_status"]
            if status == "not_found":
                raise NotFound(f"session {session_id!r} not found")
            if status == "mismatch":
                raise InvalidArgument("idempotency_key", _KEY_REUSED)
            record = _record(row["o_row"])
            if status == "conflict":
                raise Aborted(
                    f"session is at version {record.version}, not {expected_version}",
                    current_version=record.version,
                )
            first, last = row["o_first"], row["o_last"]
            if status == "replayed":
                rows = await conn.fetch(_SQL_RANGE, record.internal_id, first, last)
                return AppendOutcome(record, [_turn(r) for r in rows], replayed=True)
            stored = [
                StoredTurn(first + i, t.role, t.token_count, t.tool_calls, t.payload, now)
                for i, t in enumerate(turns)
            ]
            return AppendOutcome(record, stored)

        return await self._run(work)

    async def list_turns(
        self,
        scope: Scope,
        session_id: str,
        now: float,
        after_seq: int,
        limit: int,
        *,
        consistent: bool = False,
    ) -> list[StoredTurn] | None:
        async def work(conn: asyncpg.Connection) -> list[StoredTurn] | None:
            rows = await conn.fetch(
                _SQL_TURNS, scope.tenant_id, scope.user_id, session_id, _ts(now), after_seq, limit
            )
            if rows:
                return [_turn(r) for r in rows]
            # No rows: an empty page of a visible session, or no such session for this caller.
            exists = await conn.fetchrow(_SQL_GET, scope.tenant_id, scope.user_id, session_id, _ts(now))
            return None if exists is None else []

        return await self._run(work, replica=not consistent)

    async def context_tail(
        self, scope: Scope, session_id: str, now: float, limit: int
    ) -> tuple[SessionRecord, list[StoredTurn]] | None:
        async def work(conn: asyncpg.Connection) -> tuple[SessionRecord, list[StoredTurn]] | None:
            rows = await conn.fetch(_SQL_TAIL, scope.tenant_id, scope.user_id, session_id, _ts(now), limit)
            if not rows:
                return None
            turns = [_turn(r, "t_") for r in rows if r["t_seq"] is not None]
            return _record(rows[0]), turns

        return await self._run(work)

    async def turns_before(
        self, record: SessionRecord, above_seq: int, below_seq: int, limit: int
    ) -> list[StoredTurn]:
        async def work(conn: asyncpg.Connection) -> list[StoredTurn]:
            rows = await conn.fetch(_SQL_BEFORE, record.internal_id, above_seq, below_seq, limit)
            return [_turn(r) for r in rows]

        return await self._run(work)

    async def save_summary(
        self,
        record: SessionRecord,
        expected_seq: int,
        new_seq: int,
        summary: str,
        summary_tokens: int,
        summarized_tokens: int,
    ) -> bool:
        async def work(conn: asyncpg.Connection) -> bool:
            status = await conn.execute(
                _SQL_SAVE_SUMMARY,
                record.internal_id,
                expected_seq,
                summary,
                summary_tokens,
                new_seq,
                summarized_tokens,
            )
            return bool(status == "UPDATE 1")

        return await self._run(work)

    async def sweep(self, now: float, batch: int, idempotency_before: float) -> int:
        async def work(conn: asyncpg.Connection) -> int:
            status = await conn.execute(_SQL_SWEEP, _ts(now), batch, int(now) // 3600)
            await conn.execute(_SQL_SWEEP_KEYS, _ts(idempotency_before), batch)
            return int(status.split()[-1])

        return await self._run(work)
