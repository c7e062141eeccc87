"""Memory and CPU of each service as its own process (one pod each), idle and under a small load:
the numbers behind the resource requests and limits in deploy/kubernetes/.

    .venv/bin/python -m bench.service_footprint [--seconds 60] [--agents 8] [--latency-ms 200]

Starts `ballast serve <name>` for the five services and the queue worker (the edge with its
workers off, BALLAST_EDGE_WORKERS=0), each its own process as in a cluster, on the real stores:
limiter, cache, edge queue and router hints on Redis (127.0.0.1:6379, a fresh key prefix),
sessions on PostgreSQL (127.0.0.1:5432, a fresh schema, dropped afterwards). The cache embeds
with its default local model. `--agents` simulated agents then chat in sessions (half the
questions repeat, so the cache hits) and one submitter queues a job every 100 ms, for
`--seconds`, against SIMULATED providers answering in `--latency-ms`. Every second it reads
each process's resident memory (VmRSS) and CPU time from /proc. Load generator, services and
stores share the machine, so CPU per call is an upper bound. Results go to
bench/results/service_footprint.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2, edge_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit.net import free_port
from tests.support.suite_config import ADMIN_KEY, write_test_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ROLES = ("router", "limiter", "cache", "sessions", "edge", "worker")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Sample:
    rss_mib: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    at: list[float] = field(default_factory=list)


def _read(pid: int) -> tuple[float, float]:
    """Resident MiB and CPU seconds (user + system) of one process."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / CLOCK_TICKS
    rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20
    return rss, cpu


async def _healthy(port: int, deadline: float) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"port {port} never served")
            await asyncio.sleep(0.2)


async def _load(edge_port: int, agents: int, seconds: float) -> dict[str, int]:
    counts = {"chats": 0, "jobs": 0, "errors": 0}
    stop = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(f"127.0.0.1:{edge_port}") as channel:
        edge = edge_pb2_grpc.EdgeServiceStub(channel)
        admin = edge_pb2_grpc.EdgeAdminServiceStub(channel)
        created = await admin.CreateApiKey(
            edge_pb2.CreateApiKeyRequest(
                tenant_id="bench-" + secrets.token_hex(4), user_id="u", tier="enterprise"
            ),
            metadata=(("x-admin-key", ADMIN_KEY),),
        )
        key = (("authorization", f"Bearer {created.api_key}"),)

        async def agent(index: int) -> None:
            session = (await edge.CreateSession(edge_pb2.CreateSessionRequest(), metadata=key)).session
            turn = 0
            while time.monotonic() < stop:
                # Half the questions repeat across agents (cache hits), half are new.
                text = (
                    f"question {turn % 5}"
                    if turn % 2
                    else f"agent {index} turn {turn} {uuid.uuid4().hex[:6]}"
                )
                try:
                    await edge.Chat(
                        edge_pb2.ChatRequest(
                            session_id=session.session_id if turn % 2 == 0 else "",
                            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)],
                        ),
                        metadata=key,
                        timeout=30,
                    )
                    counts["chats"] += 1
                except grpc.aio.AioRpcError:
                    counts["errors"] += 1
                turn += 1

        async def submitter() -> None:
            while time.monotonic() < stop:
                chat = edge_pb2.ChatRequest(
                    messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=uuid.uuid4().hex)]
                )
                try:
                    await edge.SubmitChat(edge_pb2.SubmitChatRequest(chat=chat), metadata=key, timeout=30)
                    counts["jobs"] += 1
                except grpc.aio.AioRpcError:
                    counts["errors"] += 1
                await asyncio.sleep(0.1)

        await asyncio.gather(*(agent(i) for i in range(agents)), submitter())
    return counts


async def _sample_for(pids: dict[str, int], samples: dict[str, Sample], seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        now = time.monotonic()
        for name, pid in pids.items():
            rss, cpu = _read(pid)
            samples[name].rss_mib.append(rss)
            samples[name].cpu_s.append(cpu)
            samples[name].at.append(now)
        await asyncio.sleep(1.0)


def _cores(sample: Sample, start: int, end: int) -> float:
    wall = sample.at[end] - sample.at[start]
    return (sample.cpu_s[end] - sample.cpu_s[start]) / wall if wall > 0 else 0.0


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="ballast-footprint-"))
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    redis = os.environ.get("BALLAST_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    postgres = os.environ.get("BALLAST_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    conn = await asyncpg.connect(postgres)
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    ports = {name: free_port() for name in ROLES}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BALLAST_", "OTEL_"))}
    env.update(write_test_config(folder, sim_latency_ms=args.latency_ms, sim_rpm=1_000_000))
    env.update(
        {
            "BALLAST_LOG_LEVEL": "warning",
            "BALLAST_LIMITER_STORE": f"{redis}?key_prefix={prefix}",
            "BALLAST_CACHE_STORE": f"{redis}?key_prefix={prefix}",
            "BALLAST_EDGE_STORE": f"{redis}?key_prefix={prefix}",
            "BALLAST_ROUTER_STORE": f"{redis}?key_prefix={prefix}",
            "BALLAST_SESSIONS_STORE": f"{postgres}?search_path={schema}",
            "BALLAST_EDGE_WORKERS": "0",
            **{f"BALLAST_{name.upper()}_PORT": str(port) for name, port in ports.items()},
            **{f"BALLAST_{name.upper()}_METRICS_PORT": str(free_port()) for name in ROLES},
            **{f"BALLAST_{name.upper()}_ADDR": f"127.0.0.1:{port}" for name, port in ports.items()},
        }
    )
    processes: dict[str, asyncio.subprocess.Process] = {}
    try:
        for name in ROLES:
            role_env = dict(env)
            if name == "worker":
                role_env["BALLAST_EDGE_WORKERS"] = "16"
            processes[name] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.cli", "serve", name, cwd=ROOT, env=role_env
            )
            await _healthy(ports[name], time.monotonic() + 120)
        pids = {name: p.pid for name, p in processes.items()}
        samples = {name: Sample() for name in ROLES}
        await _sample_for(pids, samples, 10)  # idle, after start-up
        idle_end = len(samples["edge"].at) - 1
        sampler = asyncio.create_task(_sample_for(pids, samples, args.seconds + 1))
        started = time.monotonic()
        counts = await _load(ports["edge"], args.agents, args.seconds)
        elapsed = time.monotonic() - started
        await sampler
        rows = []
        for name in ROLES:
            sample = samples[name]
            last = len(sample.at) - 1
            rows.append(
                {
                    "service": name,
                    "rss_idle_mib": round(sample.rss_mib[idle_end], 1),
                    "rss_peak_mib": round(max(sample.rss_mib), 1),
                    "cpu_idle_cores": round(_cores(sample, 0, idle_end), 3),
                    "cpu_load_cores": round(_cores(sample, idle_end, last), 3),
                    "cpu_load_peak_cores": round(
                        max(_cores(sample, i, i + 1) for i in range(idle_end, last)), 3
                    ),
                }
            )
        return {
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "agents": args.agents,
            "seconds": args.seconds,
            "latency_ms": args.latency_ms,
            "chats_per_s": round(counts["chats"] / elapsed, 1),
            "jobs_per_s": round(counts["jobs"] / elapsed, 1),
            "errors": counts["errors"],
            "rows": rows,
        }
    finally:
        for process in processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 60)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Service footprint: memory and CPU per process",
        "",
        f"`python -m bench.service_footprint --seconds {result['seconds']} --agents {result['agents']} "
        f"--latency-ms {result['latency_ms']}` ({result['when']}; {result['machine']}). Each service "
        "and the queue worker is its own `ballast serve` process on Redis and PostgreSQL; "
        f"{result['agents']} agents chatted ({result['chats_per_s']} chats/s) and one submitter queued "
        f"{result['jobs_per_s']} jobs/s (SIMULATED providers, {result['latency_ms']} ms); "
        f"{result['errors']} errors. Load generator, stores and services shared the machine.",
        "",
        "| service | RSS idle MiB | RSS peak MiB | CPU idle (cores) | CPU under load (cores, mean) | CPU peak second (cores) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['service']} | {row['rss_idle_mib']} | {row['rss_peak_mib']} | {row['cpu_idle_cores']} "
            f"| {row['cpu_load_cores']} | {row['cpu_load_peak_cores']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    args = parser.parse_args()
    result = asyncio.run(_run(args))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "service_footprint.json").write_text(json.dumps(result, indent=2) + "\n")
    text = _markdown(result)
    (RESULTS / "service_footprint.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
