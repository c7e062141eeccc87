"""`ballast migrate sessions`: applies the sessions schema migrations and exits, so a deployment
can migrate once (a Kubernetes Job) before the new replicas roll; `--wait` lets a new replica
wait until the migrations it needs are there instead of applying them itself.

The migrations are the store's own (services/sessions/store/postgres.py), applied under the same
advisory lock, so a replica that starts meanwhile and migrates too is harmless.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from services.sessions.config import SessionsSettings
from services.sessions.store.postgres import MIGRATIONS, migrate

log = logging.getLogger("ballast.sessions.migrate")


class MigrateError(Exception):
    """Nothing to migrate (the store is not PostgreSQL), or the database refused or is away."""


def _dsn(settings: SessionsSettings) -> str:
    if not settings.store_url.startswith(("postgresql://", "postgres://")):
        raise MigrateError(
            f"BALLAST_SESSIONS_STORE={settings.store_url!r} has no schema to migrate: "
            "expected a postgresql:// URL"
        )
    return settings.store_url


async def apply(settings: SessionsSettings) -> list[int]:
    """Applies the migrations the database lacks; returns their versions."""
    dsn = _dsn(settings)
    try:
        conn = await asyncpg.connect(dsn, timeout=settings.connect_timeout)
        try:
            return await migrate(conn)
        finally:
            await conn.close()
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise MigrateError(
            f"the sessions database could not be migrated: {type(exc).__name__}: {exc}"
        ) from exc


async def missing(settings: SessionsSettings) -> list[int]:
    """Versions this build knows that the database has not applied."""
    conn = await asyncpg.connect(_dsn(settings), timeout=settings.connect_timeout)
    try:
        exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        done = (
            {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
            if exists
            else set()
        )
    finally:
        await conn.close()
    return [version for version, _, _ in MIGRATIONS if version not in done]


async def wait(settings: SessionsSettings, patience: float, interval: float = 2.0) -> list[int]:
    """Polls until the database has every migration this build knows; returns what is still
    missing when `patience` seconds ran out (empty on success). A database that cannot be
    reached yet counts as missing everything."""
    deadline = time.monotonic() + patience
    while True:
        try:
            lacking = await missing(settings)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            log.info("sessions database not reachable yet: %s", type(exc).__name__)
            lacking = [version for version, _, _ in MIGRATIONS]
        if not lacking or time.monotonic() >= deadline:
            return lacking
        await asyncio.sleep(interval)
