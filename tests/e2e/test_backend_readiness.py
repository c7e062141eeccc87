"""Readiness follows a required backend, liveness does not: services as processes, their own Redis
or PostgreSQL stopped and started again under them.

What Kubernetes sees: while the backend is down, the readiness probe (health service "") says
NOT_SERVING, so the pod leaves the Service's endpoints; the liveness probe ("liveness") stays
SERVING throughout, so the pod is not restarted in a loop; when the backend returns, readiness
does too, without a restart. The backends are private instances on free ports; the shared Redis
and PostgreSQL are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit.server import LIVENESS
from tests.support.backends import PrivatePostgres, PrivateRedis, free_port, private_postgres, private_redis
from tests.support.suite_config import write_test_config
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Generous: starting Python processes on a busy 2-core machine is slow, never wrong.
WITHIN = 120.0
# Checked often, two failures in a row make an outage: the test waits seconds, not minutes.
CHECKS = {
    "BALLAST_BACKEND_CHECK_INTERVAL": "200ms",
    "BALLAST_BACKEND_CHECK_TIMEOUT": "1s",
    "BALLAST_BACKEND_CHECK_FAILURES": "2",
}


class Process:
    """One `ballast` process and the health ports of the roles it runs."""

    def __init__(self, process: asyncio.subprocess.Process, ports: Mapping[str, int], log: Path) -> None:
        self.process = process
        self.ports = dict(ports)
        self.log = log

    def tail(self) -> str:
        return self.log.read_text()[-3000:]


async def _start(
    args: Sequence[str], environ: Mapping[str, str], ports: Mapping[str, int], log: Path
) -> Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BALLAST_", "OTEL_"))}
    env.update({"BALLAST_METRICS": "false", "BALLAST_LOG_FORMAT": "text", **CHECKS, **environ})
    env.update({f"BALLAST_{role.upper()}_PORT": str(port) for role, port in ports.items()})
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", *args, cwd=ROOT, env=env, stderr=out
        )
    return Process(process, ports, log)


async def _status(port: int, service: str) -> int | None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
        except grpc.aio.AioRpcError:
            return None
    return int(reply.status)


async def _until(process: Process, status: int, what: str) -> None:
    """Every role's readiness reaches `status`; meanwhile each poll also asserts that liveness
    stays SERVING (once the process has come up) and that the process has not exited."""

    async def reached() -> bool:
        assert process.process.returncode is None, f"exited: {process.tail()}"
        statuses = {}
        for role, port in process.ports.items():
            statuses[role] = await _status(port, "")
            live = await _status(port, LIVENESS)
            if statuses[role] is not None:
                assert live == SERVING, f"{role}: liveness {live} while readiness {statuses[role]}"
        return all(s == status for s in statuses.values())

    try:
        await eventually(reached, what=what, within=WITHIN, interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{process.tail()}") from None


async def _outage_and_recovery(process: Process, stop: Callable[[], None], start: Callable[[], None]) -> None:
    await _until(process, SERVING, "every role ready")
    stop()
    await _until(process, NOT_SERVING, "readiness NOT_SERVING while the backend is down")
    start()
    await _until(process, SERVING, "readiness SERVING again once the backend answers")


@contextlib.asynccontextmanager
async def _running(*processes: Process) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for process in processes:
            if process.process.returncode is None:
                process.process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                async with asyncio.timeout(60):
                    await process.process.wait()
            except TimeoutError:
                process.process.kill()
                await process.process.wait()


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    with private_redis() as server:
        yield server


@pytest.fixture
def postgres_server() -> Iterator[PrivatePostgres]:
    with private_postgres() as server:
        yield server


async def test_redis_outage_takes_limiter_cache_edge_and_worker_out_of_rotation_only(
    redis_server: PrivateRedis, tmp_path: Path
) -> None:
    environ = {
        **write_test_config(tmp_path),
        # Closed: the limiter cannot decide without Redis, so Redis is required (README).
        "BALLAST_LIMITER_STORE": redis_server.url,
        "BALLAST_LIMITER_FAIL_MODE": "closed",
        "BALLAST_CACHE_STORE": redis_server.url.replace("/0", "/1"),
        "BALLAST_CACHE_EMBEDDER": "router",
        "BALLAST_EDGE_STORE": redis_server.url.replace("/0", "/2"),
        "BALLAST_EDGE_HTTP": "false",
    }
    services = await _start(
        ["up", "--only", "limiter,cache,edge"],
        {**environ, "BALLAST_EDGE_WORKERS": "0"},
        {"limiter": free_port(), "cache": free_port(), "edge": free_port()},
        tmp_path / "services.log",
    )
    worker = await _start(
        ["serve", "worker"],
        {**environ, "BALLAST_EDGE_WORKERS": "2"},
        {"worker": free_port()},
        tmp_path / "worker.log",
    )
    async with _running(services, worker):
        await _until(worker, SERVING, "the worker ready")
        await _until(services, SERVING, "limiter, cache and edge ready")
        redis_server.stop()
        await _until(services, NOT_SERVING, "limiter, cache and edge NOT_SERVING while Redis is down")
        await _until(worker, NOT_SERVING, "the worker NOT_SERVING while Redis is down")
        redis_server.start()
        await _until(services, SERVING, "limiter, cache and edge SERVING once Redis is back")
        await _until(worker, SERVING, "the worker SERVING once Redis is back")


async def test_postgresql_outage_takes_sessions_out_of_rotation_only(
    postgres_server: PrivatePostgres, tmp_path: Path
) -> None:
    sessions = await _start(
        ["serve", "sessions"],
        {**write_test_config(tmp_path), "BALLAST_SESSIONS_STORE": postgres_server.dsn},
        {"sessions": free_port()},
        tmp_path / "sessions.log",
    )
    async with _running(sessions):
        await _outage_and_recovery(sessions, lambda: postgres_server.stop(mode="fast"), postgres_server.start)
