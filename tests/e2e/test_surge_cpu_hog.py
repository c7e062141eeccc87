"""The surge with the CPU taken: two busy-loop processes run beside the suite (`ballast up`, in
its own process as `make demo` runs it) on this two-core machine. Paid and enterprise chats must
not fail, and every token the simulated providers reported must be charged in the limiter,
exactly once: settlement after the model answered is never lost to a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from ballast.common.v1 import common_pb2
from ballast.limiter.v1 import limiter_pb2, limiter_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ballast_demo import report
from ballast_demo.load import LoadState, run_surge
from ballast_demo.scenario import ScenarioConfig, plan_users, write_suite_config
from services.kit.config import SERVICE_NAMES
from tests.support.backends import free_port
from tests.support.waiting import eventually, until_passes

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "hog-admin"
# Busy processes beside the suite: as many as the machine has cores (the CI machine has two).
HOGS = 2


@contextlib.contextmanager
def cpu_hogs(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


async def _serving(port: int) -> bool:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        except grpc.aio.AioRpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@contextlib.asynccontextmanager
async def ballast_up(environ: dict[str, str], log: Path) -> AsyncIterator[dict[str, int]]:
    """`ballast up` in a process of its own, every port free; yields the services' ports."""
    ports = {name: free_port() for name in SERVICE_NAMES}
    env = {
        **os.environ,
        **environ,
        "BALLAST_HOST": "127.0.0.1",
        "BALLAST_LOG_LEVEL": "warning",
        "BALLAST_EDGE_HTTP_PORT": "0",
    }
    for name, port in ports.items():
        env[f"BALLAST_{name.upper()}_PORT"] = str(port)
        env[f"BALLAST_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
        env[f"BALLAST_{name.upper()}_METRICS_PORT"] = "0"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "up", cwd=ROOT, env=env, stdout=out, stderr=out
        )
        try:
            for port in ports.values():

                async def up(port: int = port) -> bool:
                    assert process.returncode is None, f"the suite exited; see {log}"
                    return await _serving(port)

                await eventually(up, what=f"the suite serving on port {port}", within=120, interval=0.25)
            yield ports
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 30)
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def reported_tokens(config: ScenarioConfig) -> int:
    """Tokens of every chat answer the simulated providers delivered (their usage)."""
    total = 0
    async with httpx.AsyncClient(timeout=10) as client:
        for port in (config.primary_port, config.secondary_port):
            stats = (await client.get(f"http://127.0.0.1:{port}/admin/stats")).json()
            total += int(stats["tokens"])
    return total


async def charged_tokens(limiter_port: int, state: LoadState) -> int:
    """Tokens the limiter settled today for the run's users."""
    total = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limiter_port}") as channel:
        stub = limiter_pb2_grpc.LimiterServiceStub(channel)
        for user, tier in state.users.items():
            usage = await stub.GetUsage(
                limiter_pb2.GetUsageRequest(
                    caller=common_pb2.Caller(tenant_id=state.tenant, user_id=user, tier=tier)
                ),
                timeout=10,
            )
            total += usage.tokens_today
    return total


@pytest.mark.slow
async def test_paid_and_enterprise_do_not_fail_and_every_token_is_charged_with_the_cpu_taken(
    tmp_path: Path,
) -> None:
    config = ScenarioConfig(
        duration_s=15,
        ramp_s=3,
        start_users=10,
        peak_users=100,
        think_s=(0.2, 0.6),
        outage_start_s=5,
        outage_s=5,
        primary_latency_ms=20,
        secondary_latency_ms=40,
        tokens_per_second=5000,
    ).with_ports(free_port(), free_port())
    environ = {
        **write_suite_config(tmp_path, config, ROOT),
        "BALLAST_EDGE_ADMIN_KEY": ADMIN,
        # The hogs on a two-core machine starve the suite's calls past a short fixed internal
        # timeout as a much busier machine does past the default 2 s (where `make demo` failed
        # paid chats and lost settlements). Paid and enterprise chats must not depend on it.
        "BALLAST_EDGE_DOWNSTREAM_TIMEOUT": "250ms",
        # Free users' queued turns give up soon after the run rather than wait out the hour.
        "BALLAST_EDGE_JOB_MAX_WAIT": f"{config.duration_s + 5:.0f}s",
    }
    async with ballast_up(environ, tmp_path / "suite.log") as ports:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{ports['edge']}") as edge,
            grpc.aio.insecure_channel(f"127.0.0.1:{ports['router']}") as router,
        ):
            with cpu_hogs(HOGS):
                state = await run_surge(edge, router, ADMIN, config, plan_users(config))
        rows = {row["tier"]: row for row in report.tier_rows(state.events, config)}
        failures = {
            tier: sorted({(e.kind, e.code) for e in state.events if e.tier == tier and e.outcome == "failed"})
            for tier in ("free", "paid", "enterprise")
        }
        print(
            "\nsurge with the CPU taken:", {t: rows.get(t) for t in ("free", "paid", "enterprise")}, failures
        )
        tokens: dict[str, int] = {}

        # Settlement may still be on its way (retried, or recorded and applied later): poll.
        async def every_token_charged() -> None:
            tokens["reported"] = await reported_tokens(config)
            tokens["charged"] = await charged_tokens(ports["limiter"], state)
            assert tokens["reported"] > 0
            assert tokens["charged"] == tokens["reported"], tokens

        try:
            await until_passes(every_token_charged, within=60, interval=0.5)
        finally:
            print(
                "tokens:", tokens, "in the answers the clients received:", sum(e.tokens for e in state.events)
            )
        assert rows["all"]["requests"] > 20
        for tier in ("paid", "enterprise"):
            assert tier in rows, f"no {tier} traffic in the run"
            assert rows[tier]["failed"] == 0, (rows[tier], failures[tier])
        # The outage really happened: some answers needed the second provider.
        assert rows["all"]["failovers"] > 0
