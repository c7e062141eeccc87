"""The edge's OpenAI-compatible HTTP face side by side with gRPC `EdgeService/Chat`, same pipeline.

    .venv/bin/python -m bench.openai_http [--requests 1000] [--rounds 3] [--concurrency 1,16]

Runs `ballast up` (all five services in one process, embedded defaults) as a subprocess whose
simulated providers point at one standalone SIMULATED provider process answering at zero
latency, so neither the provider nor the load generator is counted. Every request is a
routing-only chat turn: cache bypassed, no session, one short question to `sim-small`. For each
concurrency, rounds alternate the two faces (gRPC, then HTTP) and measure:

  CPU/req    user+system CPU of the suite's process (every service, all threads, from
             /proc/<pid>/stat) over the round, divided by its requests
  p50, p99   client-side latency, and the same minus a direct call to the provider (`added`)

Both faces and the direct provider calls use equally thin clients: grpc.aio for gRPC, a
minimal keep-alive HTTP/1.1 client for HTTP (one connection per worker), so client costs do not
blur the comparison. Tracing is off (OTEL_SDK_DISABLED), metrics on. The table goes to stdout and
bench/results/openai_http.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import orjson
import yaml
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2, edge_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit.net import free_port
from tests.support.suite_config import ADMIN_KEY, write_test_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TICKS = os.sysconf("SC_CLK_TCK")
SYSTEM = "You are a support agent for an online shop. Answer in two sentences."
QUESTION = "How do I reset my password if I no longer have access to my email?"


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client: one connection, one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._writer.write(
            (
                f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n{extra}\r\n"
            ).encode()
            + body
        )
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
        }
        if "content-length" in fields:
            return status, await self._reader.readexactly(int(fields["content-length"]))
        parts: list[bytes] = []
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await self._reader.readexactly(size + 2)
            if size == 0:
                return status, b"".join(parts)
            parts.append(chunk[:-2])

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("ab")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=handle, stderr=handle)


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


async def _healthy(address: str, within: float = 180.0) -> None:
    deadline = time.monotonic() + within
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{address} did not become healthy")
            await asyncio.sleep(0.25)


async def _tcp_ready(port: int, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _round(
    call: Callable[[int], Awaitable[None]], requests: int, concurrency: int, pid: int | None
) -> dict[str, float]:
    latencies: list[float] = []
    counter = iter(range(requests))

    async def worker(slot: int) -> None:
        for _ in counter:
            started = time.perf_counter()
            await call(slot)
            latencies.append((time.perf_counter() - started) * 1000)

    cpu_before = _cpu_seconds(pid) if pid else 0.0
    await asyncio.gather(*(worker(slot) for slot in range(concurrency)))
    cpu = (_cpu_seconds(pid) - cpu_before) if pid else 0.0
    return {
        "cpu_ms": cpu * 1000 / requests,
        "p50_ms": statistics.median(latencies),
        "p99_ms": _percentile(latencies, 0.99),
    }


def _catalog(folder: Path, environ: dict[str, str], sim_port: int) -> None:
    path = Path(environ["BALLAST_ROUTER_CATALOG_FILE"])
    catalog = yaml.safe_load(path.read_text())
    catalog["providers"]["sim-primary"]["base_url"] = f"http://127.0.0.1:{sim_port}/v1"
    catalog["providers"]["sim-secondary"]["base_url"] = f"http://127.0.0.1:{sim_port}"
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))


async def _run(requests: int, rounds: int, concurrencies: list[int], folder: Path) -> list[dict[str, Any]]:
    environ = write_test_config(folder, sim_latency_ms=0.0)
    sim_port = free_port()
    _catalog(folder, environ, sim_port)
    ports = {name: free_port() for name in ("edge", "router", "limiter", "cache", "sessions")}
    http_port = free_port()
    env = {
        **os.environ,
        **environ,
        "BALLAST_LOG_LEVEL": "warning",
        "OTEL_SDK_DISABLED": "true",
        "BALLAST_EDGE_HTTP_PORT": str(http_port),
        "BALLAST_EDGE_MAX_IN_FLIGHT": "4096",
    }
    for name, port in ports.items():
        env[f"BALLAST_{name.upper()}_PORT"] = str(port)
        env[f"BALLAST_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
        env[f"BALLAST_{name.upper()}_METRICS_PORT"] = str(free_port())
    sim = _start(
        [
            sys.executable,
            "-m",
            "services.router.sim",
            "--port",
            str(sim_port),
            "--name",
            "sim-bench",
            "--latency-ms",
            "0",
            "--distribution",
            "fixed",
            "--tokens-per-second",
            "0",
        ],
        env,
        folder / "sim.log",
    )
    suite = _start([sys.executable, "-m", "services.cli", "up"], env, folder / "suite.log")
    rows: list[dict[str, Any]] = []
    try:
        for port in ports.values():
            await _healthy(f"127.0.0.1:{port}")
        await _tcp_ready(http_port)
        await _tcp_ready(sim_port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['edge']}") as channel:
            admin = edge_pb2_grpc.EdgeAdminServiceStub(channel)
            edge = edge_pb2_grpc.EdgeServiceStub(channel)
            created = await admin.CreateApiKey(
                edge_pb2.CreateApiKeyRequest(
                    tenant_id="bench-" + secrets.token_hex(4), user_id="u", tier="enterprise"
                ),
                metadata=(("x-admin-key", ADMIN_KEY),),
            )
            key = created.api_key
            grpc_request = edge_pb2.ChatRequest(
                model="sim-small",
                system_prompt=SYSTEM,
                messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=QUESTION)],
                cache_mode=edge_pb2.CACHE_MODE_BYPASS,
            )
            metadata = (("authorization", f"Bearer {key}"),)
            http_body = orjson.dumps(
                {
                    "model": "sim-small",
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": QUESTION},
                    ],
                }
            )
            http_headers = {"authorization": f"Bearer {key}", "x-ballast-cache": "bypass"}
            provider_body = orjson.dumps(
                {
                    "model": "sim-small-1",
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": QUESTION},
                    ],
                }
            )
            for concurrency in concurrencies:
                http_clients = [RawHttp("127.0.0.1", http_port) for _ in range(concurrency)]
                sim_clients = [RawHttp("127.0.0.1", sim_port) for _ in range(concurrency)]

                async def grpc_call(slot: int) -> None:
                    await edge.Chat(grpc_request, metadata=metadata)

                async def http_call(slot: int, clients: list[RawHttp] = http_clients) -> None:
                    status, body = await clients[slot].post("/v1/chat/completions", http_body, http_headers)
                    if status != 200:
                        raise RuntimeError(f"HTTP face answered {status}: {body[:200]!r}")

                async def direct_call(slot: int, clients: list[RawHttp] = sim_clients) -> None:
                    status, body = await clients[slot].post("/v1/chat/completions", provider_body, {})
                    if status != 200:
                        raise RuntimeError(f"provider answered {status}: {body[:200]!r}")

                # Warm-up: connections, caches of the interpreter, the router's EWMA.
                for call in (direct_call, grpc_call, http_call):
                    await _round(call, min(200, requests), concurrency, None)
                measured: dict[str, list[dict[str, float]]] = {"direct": [], "grpc": [], "http": []}
                for _ in range(rounds):
                    measured["direct"].append(await _round(direct_call, requests, concurrency, None))
                    measured["grpc"].append(await _round(grpc_call, requests, concurrency, suite.pid))
                    measured["http"].append(await _round(http_call, requests, concurrency, suite.pid))
                for client in (*http_clients, *sim_clients):
                    await client.close()

                def median(
                    face: str, metric: str, measured: dict[str, list[dict[str, float]]] = measured
                ) -> float:
                    return statistics.median(r[metric] for r in measured[face])

                direct_p50, direct_p99 = median("direct", "p50_ms"), median("direct", "p99_ms")
                for face in ("grpc", "http"):
                    row = {
                        "concurrency": concurrency,
                        "face": face,
                        "cpu_ms": median(face, "cpu_ms"),
                        "cpu_ms_rounds": [r["cpu_ms"] for r in measured[face]],
                        "p50_ms": median(face, "p50_ms"),
                        "p99_ms": median(face, "p99_ms"),
                        "added_p50_ms": median(face, "p50_ms") - direct_p50,
                        "added_p99_ms": median(face, "p99_ms") - direct_p99,
                        "direct_p50_ms": direct_p50,
                        "direct_p99_ms": direct_p99,
                    }
                    rows.append(row)
                    print(_row(row), flush=True)
                grpc_row, http_row = rows[-2], rows[-1]
                print(
                    f"  concurrency {concurrency}: the HTTP face costs {http_row['cpu_ms'] - grpc_row['cpu_ms']:+.3f} ms "
                    f"CPU per request against gRPC Chat",
                    flush=True,
                )
    finally:
        _stop([suite, sim])
    return rows


HEADER = (
    "| conc | face | CPU ms/req (median; rounds) | p50 ms | p99 ms | added p50 ms | added p99 ms | provider p50 / p99 ms |\n"
    "|---:|---|---:|---:|---:|---:|---:|---:|"
)


def _row(r: dict[str, Any]) -> str:
    rounds = ", ".join(f"{c:.3f}" for c in r["cpu_ms_rounds"])
    name = "gRPC Chat" if r["face"] == "grpc" else "HTTP /v1/chat/completions"
    return (
        f"| {r['concurrency']} | {name} | {r['cpu_ms']:.3f} ({rounds}) | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
        f"{r['added_p50_ms']:+.2f} | {r['added_p99_ms']:+.2f} | {r['direct_p50_ms']:.2f} / {r['direct_p99_ms']:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000, help="requests per face per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,16")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="ballast-openai-http-"))
    print(HEADER, flush=True)
    rows = asyncio.run(_run(args.requests, args.rounds, concurrencies, folder))
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load {os.getloadavg()[0]:.1f} at the end"
    )
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    summary = []
    for concurrency in concurrencies:
        by_face = {r["face"]: r for r in rows if r["concurrency"] == concurrency}
        summary.append(
            f"- concurrency {concurrency}: HTTP face {by_face['http']['cpu_ms'] - by_face['grpc']['cpu_ms']:+.3f} ms "
            f"CPU per request against gRPC Chat (aim: at most +0.3 ms)"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "openai_http.md").write_text(
        "# OpenAI-compatible HTTP face against gRPC Chat\n\n"
        f"{stamp}; {machine}; `python -m bench.openai_http --requests {args.requests} --rounds {args.rounds} "
        f"--concurrency {args.concurrency}`. Routing-only chat turns (cache bypassed, no session) through "
        "`ballast up` in its own process; a standalone SIMULATED provider at zero latency; CPU is the "
        "suite process's user+system time per request; `added` is over a direct call to the provider.\n\n"
        + "\n".join([HEADER, *(_row(r) for r in rows)])
        + "\n\n"
        + "\n".join(summary)
        + "\n"
    )
    (RESULTS / "openai_http.json").write_text(
        json.dumps({"when": stamp, "machine": machine, "rows": rows}, indent=2)
    )
    print("\n".join(summary))


if __name__ == "__main__":
    main()
