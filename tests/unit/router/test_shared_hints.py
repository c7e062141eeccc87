"""Two router replicas sharing breaker hints through Redis: once one has seen the primary fail,
the other skips it too, and both return to it once it recovers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

from ballast.router.v1 import router_pb2

from services.router.app import RouterApp
from services.router.catalog import SimSpec
from services.router.health import BreakerState
from services.router.sim import Fault
from tests.conftest import SuiteFactory
from tests.unit.router.conftest import FAST_ENV, SimFactory, complete_request, two_provider_catalog, write


async def test_an_open_breaker_on_one_replica_spares_the_other(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path, redis_url: str
) -> None:
    primary = await sim_factory("sim-p", SimSpec(latency_median_ms=0))
    secondary = await sim_factory("sim-s", SimSpec(latency_median_ms=0))
    env = {
        **FAST_ENV,
        "BALLAST_ROUTER_CATALOG_FILE": write(tmp_path, two_provider_catalog(primary, secondary)),
        "BALLAST_ROUTER_STORE": redis_url,
        "BALLAST_ROUTER_HINTS_INTERVAL": "20ms",
        "BALLAST_ROUTER_BREAKER_FAILURES": "1",
        "BALLAST_ROUTER_BREAKER_OPEN_FOR": "1m",
    }
    one = await suite_factory(["router"], env)
    two = await suite_factory(["router"], env)
    primary.set_fault(Fault("error"))
    first = await one.router.Complete(complete_request(), timeout=5)
    assert [a.provider for a in first.attempts] == ["primary", "secondary"]
    app_two = cast(RouterApp, two.running["router"].app)
    for _ in range(100):
        if app_two.health.state(("primary", "primary-model")) is BreakerState.OPEN:
            break
        await asyncio.sleep(0.02)
    seen = primary.stats.requests
    reply = await two.router.Complete(complete_request(), timeout=5)
    assert [a.provider for a in reply.attempts] == ["secondary"]
    assert primary.stats.requests == seen  # replica two never paid for the primary's outage
    status = await two.router.GetProviderStatus(
        router_pb2.GetProviderStatusRequest(provider="primary"), timeout=5
    )
    assert {s.model: s.breaker for s in status.providers}["primary-model"] == router_pb2.BREAKER_STATE_OPEN

    # Replica one probes the recovered primary (its breaker clock moved past the open window)
    # and clears the hint; replica two follows at its next sync.
    primary.set_fault(None)
    app_one = cast(RouterApp, one.running["router"].app)
    app_one.health.get(("primary", "primary-model")).opened_at -= 61
    probe = await one.router.Complete(complete_request(), timeout=5)
    assert [a.provider for a in probe.attempts] == ["primary"]
    for _ in range(100):
        if app_two.health.state(("primary", "primary-model")) is BreakerState.CLOSED:
            break
        await asyncio.sleep(0.02)
    back = await two.router.Complete(complete_request(), timeout=5)
    assert [a.provider for a in back.attempts] == ["primary"]


async def test_an_unreachable_store_never_affects_completions(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path
) -> None:
    primary = await sim_factory("sim-p", SimSpec(latency_median_ms=0))
    secondary = await sim_factory("sim-s", SimSpec(latency_median_ms=0))
    env = {
        **FAST_ENV,
        "BALLAST_ROUTER_CATALOG_FILE": write(tmp_path, two_provider_catalog(primary, secondary)),
        "BALLAST_ROUTER_STORE": "redis://127.0.0.1:1/0",
        "BALLAST_ROUTER_HINTS_INTERVAL": "10ms",
        "BALLAST_ROUTER_BREAKER_FAILURES": "1",
    }
    suite = await suite_factory(["router"], env)
    primary.set_fault(Fault("error"))
    for _ in range(5):
        reply = await suite.router.Complete(complete_request(), timeout=5)
        assert reply.provider == "secondary"
    await asyncio.sleep(0.05)
    app = cast(RouterApp, suite.running["router"].app)
    assert app.sharer is not None and app.sharer.failures > 0
