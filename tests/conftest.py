"""Shared fixtures: in-process services on free ports, and isolated real Redis and PostgreSQL.

Redis and PostgreSQL tests skip on a laptop without them, but fail in CI (CI=true):
a green CI run must mean the real stores were exercised.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlencode

import asyncpg
import pytest
import redis
from hypothesis import HealthCheck, settings

from services.testing import Suite, start_suite
from tests.support.backends import PrivateRedisCluster

REDIS_URL = os.environ.get("BALLAST_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_DSN = os.environ.get("BALLAST_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
T = TypeVar("T")
# No property in this suite is about speed (speed targets live in bench/): hypothesis's per-example
# deadline (200 ms) and its too-slow health check would only measure how busy the machine is.
settings.register_profile("ballast", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ballast")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# The edge loads the demo keys (bk_demo_*) only when told to; the tests use them, on loopback.
os.environ.setdefault(
    "BALLAST_EDGE_KEYS_FILE", str(Path(__file__).resolve().parents[1] / "config" / "edge_keys.yaml")
)


def _unavailable(what: str, exc: BaseException) -> None:
    message = f"{what} is not reachable ({exc}); start it or set the BALLAST_TEST_* URL"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@contextlib.contextmanager
def _isolated_redis_url() -> Iterator[str]:
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except Exception as exc:
        client.close()
        _unavailable("Redis", exc)
    sep = "&" if "?" in REDIS_URL else "?"
    try:
        yield f"{REDIS_URL}{sep}{urlencode({'key_prefix': prefix})}"
    finally:
        # Hash-tagged keys start with the prefix too, so one pattern finds everything.
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis URL whose `key_prefix` isolates this test; its keys are deleted afterwards.

    Synchronous on purpose, so async fixtures may also ask for it with request.getfixturevalue.
    """
    with _isolated_redis_url() as url:
        yield url


@pytest.fixture(scope="module")
def module_redis_url() -> Iterator[str]:
    """Like redis_url, shared by a module's tests (for processes they all use)."""
    with _isolated_redis_url() as url:
        yield url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[PrivateRedisCluster]:
    """One real Redis Cluster for the whole session (three primaries, each with a replica),
    started on first use: six redis-servers are too many to start per module on a small machine.
    Tests share it, so each works under its own key prefix (`redis_cluster_url`) or tenant, and
    a test that fails a primary over leaves a cluster that is ok again (`fail_over` waits)."""
    try:
        cluster = PrivateRedisCluster(masters=3, replicas=1)
    except RuntimeError as exc:
        _unavailable("Redis Cluster", exc)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def redis_cluster_url(redis_cluster: PrivateRedisCluster) -> Iterator[str]:
    """The session's Redis Cluster as a store URL (`?cluster=true`) with a `key_prefix` that
    isolates this test; its keys, on every primary, are deleted afterwards."""
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    yield f"{redis_cluster.url}&{urlencode({'key_prefix': prefix})}"
    redis_cluster.delete_matching(f"{prefix}*")


def _run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


# Other sessions holding locks on relations of one schema (the test's own, about to be dropped).
_END_SCHEMA_LOCK_HOLDERS = """
SELECT pg_terminate_backend(l.pid) FROM pg_locks l
  JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = $1 AND l.pid <> pg_backend_pid() GROUP BY l.pid"""
DROP_ATTEMPTS = 30


@pytest.fixture
def postgres_dsn() -> Iterator[str]:
    """A DSN whose search_path is a fresh schema, dropped afterwards (synchronous, like redis_url)."""
    schema = f"test_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await asyncpg.connect(POSTGRES_DSN, timeout=5)
        try:
            await conn.execute(f'CREATE SCHEMA "{schema}"')
        finally:
            await conn.close()

    async def drop() -> None:
        # This teardown runs in a loop of its own while the test's loop is suspended. A service the
        # test started there (its suite stops later if its fixture was set up first) may hold a
        # transaction on this schema that can never finish now, and DROP would wait for it for
        # ever: such holders are ended first, and DROP waits only briefly before trying again.
        conn = await asyncpg.connect(POSTGRES_DSN, timeout=5)
        try:
            await conn.execute("SET lock_timeout = '2s'")
            for _ in range(DROP_ATTEMPTS):
                await conn.execute(_END_SCHEMA_LOCK_HOLDERS, schema)
                try:
                    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                    return
                except asyncpg.exceptions.LockNotAvailableError:
                    continue
            raise AssertionError(f"schema {schema} could not be dropped: its locks stayed held")
        finally:
            await conn.close()

    try:
        _run(create())
    except Exception as exc:
        _unavailable("PostgreSQL", exc)
    sep = "&" if "?" in POSTGRES_DSN else "?"
    yield f"{POSTGRES_DSN}{sep}{urlencode({'search_path': schema})}"
    _run(drop())


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
        # Nothing is asserted after a test: no grace to drain (tests of draining stop suites themselves).
        await suite.stop(grace=0)
