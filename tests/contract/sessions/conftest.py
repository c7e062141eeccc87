"""Every contract test runs against the memory store and a real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.testing import Suite
from tests.conftest import SuiteFactory


@pytest.fixture(params=["memory", "postgres"])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    dsn: str = request.getfixturevalue("postgres_dsn")
    return dsn


@pytest.fixture
async def suite(suite_factory: SuiteFactory, store_url: str) -> AsyncIterator[Suite]:
    started = await suite_factory(
        ["sessions"], {"BALLAST_SESSIONS_STORE": store_url, "BALLAST_SESSIONS_COMPACTION": "false"}
    )
    yield started
    # Nothing is in flight once a test is over: skip the shutdown grace period.
    await started.stop(0)
