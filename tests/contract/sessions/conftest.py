"""Every contract test runs against the memory store and a real PostgreSQL."""

from __future__ import annotations

import pytest

from services.kit.testing import Suite
from tests.conftest import SuiteFactory


@pytest.fixture(params=["memory", "postgres"])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    dsn: str = request.getfixturevalue("postgres_dsn")
    return dsn


@pytest.fixture
async def suite(suite_factory: SuiteFactory, store_url: str) -> Suite:
    return await suite_factory(
        ["sessions"], {"BALLAST_SESSIONS_STORE": store_url, "BALLAST_SESSIONS_COMPACTION": "false"}
    )
