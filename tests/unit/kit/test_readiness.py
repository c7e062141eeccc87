"""Readiness follows the backends a service requires (ServiceApp.backend_probes); liveness does not.

The probe here is the test's own: each check waits for the result the test hands it, so every
step is decided by the test, not by how fast the machine runs the checks. The real backends'
probes are exercised against real Redis and PostgreSQL in tests/e2e/test_backend_readiness.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Mapping

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit.server import LIVENESS, BackendProbe, RunningService, start_service
from tests.support.waiting import eventually
from tests.unit.kit import probe_app

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class BackedApp(probe_app.ProbeApp):
    """The probe app with one required backend whose checks the test answers one by one."""

    def __init__(self, *, failures: int = 2, timeout: float = 30.0, hang: bool = False) -> None:
        base = probe_app.make()
        settings = dataclasses.replace(
            base.server_settings,
            backend_check_interval=0.01,
            backend_check_timeout=timeout,
            backend_check_failures=failures,
            # The health-only port answers while the main port drains (it stops last).
            health_port=0,
        )
        super().__init__(settings, base.telemetry)
        self.results: asyncio.Queue[bool] = asyncio.Queue()
        self.checks = 0
        self.check_cancelled = False
        # A check is waiting for the test's answer.
        self.waiting = False
        self.hang = hang
        self.drained = asyncio.Event()
        self.release_drain = asyncio.Event()

    def backend_probes(self) -> Mapping[str, BackendProbe]:
        return {"store": self._check}

    async def _check(self) -> None:
        self.checks += 1
        try:
            if self.hang:
                await asyncio.Event().wait()
            self.waiting = True
            ok = await self.results.get()
        except asyncio.CancelledError:
            self.check_cancelled = True
            raise
        finally:
            self.waiting = False
        if not ok:
            raise ConnectionError("store unreachable")

    async def drain(self, grace: float) -> None:
        self.drained.set()
        await self.release_drain.wait()


async def _status(channel: grpc.aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return int(reply.status)


async def _answer(app: BackedApp, ok: bool) -> None:
    """Answers the check in flight, then waits until the next one starts: by then the answer's
    round has been published to health."""
    await eventually(lambda: app.waiting, what="a backend check waiting for its answer")
    seen = app.checks
    app.results.put_nowait(ok)
    await eventually(lambda: app.checks > seen and app.waiting, what="the next backend check waiting")


@pytest.fixture
async def running() -> AsyncIterator[tuple[BackedApp, RunningService, grpc.aio.Channel]]:
    app = BackedApp()
    service = await start_service(app)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.health_port}") as channel:
        yield app, service, channel
    app.release_drain.set()
    await service.stop(0)


async def test_readiness_leaves_after_consecutive_failures_and_returns_on_recovery(
    running: tuple[BackedApp, RunningService, grpc.aio.Channel],
) -> None:
    app, _, channel = running
    assert await _status(channel, "") == SERVING
    await _answer(app, False)
    # One failed check is not an outage (BALLAST_BACKEND_CHECK_FAILURES=2 here).
    assert await _status(channel, "") == SERVING
    await _answer(app, False)
    for name in ("", probe_app.SERVICE):
        assert await _status(channel, name) == NOT_SERVING, name
    # Liveness never follows a backend: the pod must not be restarted for Redis being away.
    assert await _status(channel, LIVENESS) == SERVING
    await _answer(app, False)
    assert await _status(channel, "") == NOT_SERVING
    await _answer(app, True)
    for name in ("", probe_app.SERVICE, LIVENESS):
        assert await _status(channel, name) == SERVING, name


async def test_a_success_between_failures_resets_the_count(
    running: tuple[BackedApp, RunningService, grpc.aio.Channel],
) -> None:
    app, _, channel = running
    for ok in (False, True, False, True, False):
        await _answer(app, ok)
        assert await _status(channel, "") == SERVING


async def test_the_drain_keeps_readiness_not_serving_and_stops_the_checks(
    running: tuple[BackedApp, RunningService, grpc.aio.Channel],
) -> None:
    app, service, channel = running
    await _answer(app, True)
    stopping = asyncio.create_task(service.stop(5.0))
    await app.drained.wait()
    assert await _status(channel, "") == NOT_SERVING
    # The checks stopped before the drain began: the one waiting for its answer was cancelled,
    # so no later round can publish SERVING over the drain.
    assert app.check_cancelled
    assert await _status(channel, "") == NOT_SERVING
    # Liveness too: the process is going away (the kubelet stops liveness probes of a pod being
    # deleted, so this restarts nothing).
    assert await _status(channel, LIVENESS) == NOT_SERVING
    app.release_drain.set()
    await stopping


async def test_a_check_that_hangs_past_its_timeout_fails() -> None:
    app = BackedApp(failures=1, timeout=0.05, hang=True)
    service = await start_service(app)
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            await eventually(
                lambda: _is(channel, "", NOT_SERVING),
                what="readiness NOT_SERVING while the backend hangs",
            )
            assert await _status(channel, LIVENESS) == SERVING
    finally:
        app.release_drain.set()
        await service.stop(0)


async def _is(channel: grpc.aio.Channel, service: str, status: int) -> bool:
    return await _status(channel, service) == status
