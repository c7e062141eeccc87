"""Shared fixtures: in-process services on free ports, and isolated real Redis and PostgreSQL.

Redis and PostgreSQL tests skip on a laptop without them, but fail in CI (CI=true):
a green CI run must mean the real stores were exercised.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from urllib.parse import urlencode

import asyncpg
import pytest
import redis.asyncio as aioredis

from services.kit.testing import Suite, start_suite

REDIS_URL = os.environ.get("BALLAST_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_DSN = os.environ.get("BALLAST_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(what: str, exc: BaseException) -> None:
    message = f"{what} is not reachable ({exc}); start it or set the BALLAST_TEST_* URL"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """A Redis URL whose `key_prefix` isolates this test; its keys are deleted afterwards."""
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        _unavailable("Redis", exc)
    sep = "&" if "?" in REDIS_URL else "?"
    yield f"{REDIS_URL}{sep}{urlencode({'key_prefix': prefix})}"
    keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
    # Hash-tagged keys start with the prefix too, so one pattern finds everything.
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def postgres_dsn() -> AsyncIterator[str]:
    """A DSN whose search_path is a fresh schema, dropped afterwards."""
    schema = f"test_{uuid.uuid4().hex[:12]}"
    try:
        conn = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    except Exception as exc:
        _unavailable("PostgreSQL", exc)
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in POSTGRES_DSN else "?"
    yield f"{POSTGRES_DSN}{sep}{urlencode({'search_path': schema})}"
    await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    await conn.close()


SuiteFactory = Callable[..., Awaitable[Suite]]


@pytest.fixture
async def suite_factory() -> AsyncIterator[SuiteFactory]:
    """`await suite_factory(["limiter"], {"BALLAST_…": "…"})` starts services; all stop after the test."""
    started: list[Suite] = []

    async def factory(names: Iterable[str], environ: Mapping[str, str] | None = None, **kw: object) -> Suite:
        suite = await start_suite(names, environ, **kw)  # type: ignore[arg-type]
        started.append(suite)
        return suite

    yield factory
    for suite in started:
        await suite.stop()
