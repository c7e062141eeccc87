"""A whole suite on embedded defaults for end-to-end tests, with fast simulated providers.

The simulated providers keep their wire formats but answer in a few milliseconds, and the
tiers are small so limits are reached in a handful of calls. Each test makes its own tenant
through the admin API, so tests sharing the suite never share limits or sessions.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest_asyncio
from ballast.edge.v1 import edge_pb2

from services.kit.config import SERVICE_NAMES
from services.testing import Suite, start_suite
from tests.support.suite_config import ADMIN_KEY, WEBHOOK_SECRET, write_test_config

__all__ = ["ADMIN_KEY", "WEBHOOK_SECRET", "Tenant", "new_tenant", "write_test_config"]


@dataclass
class Tenant:
    """API keys of one fresh tenant: a user per tier."""

    tenant_id: str
    keys: Mapping[str, str]

    def auth(self, tier: str = "paid") -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[tier]}"),)


async def new_tenant(suite: Suite) -> Tenant:
    tenant_id = "t" + secrets.token_hex(6)
    keys = {}
    for tier in ("free", "paid", "enterprise"):
        created = await suite.edge_admin.CreateApiKey(
            edge_pb2.CreateApiKeyRequest(tenant_id=tenant_id, user_id=f"{tier}-user", tier=tier),
            metadata=(("x-admin-key", ADMIN_KEY),),
        )
        keys[tier] = created.api_key
    return Tenant(tenant_id, keys)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def suite(tmp_path_factory: Any) -> AsyncIterator[Suite]:
    environ = write_test_config(tmp_path_factory.mktemp("e2e"))
    running = await start_suite(SERVICE_NAMES, environ)
    yield running
    await running.stop(grace=0)  # nothing is asserted after the tests: no drain
