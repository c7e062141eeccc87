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

With `--litellm PATH/TO/litellm` (LiteLLM installed apart, for example
`python -m venv /tmp/litellm && /tmp/litellm/bin/pip install 'litellm[proxy]'`), LiteLLM's proxy
(one worker, a master key, no database) routing to the same provider is measured in the same
rounds, its CPU from its own process.

Both faces and the direct provider calls use equally thin clients: grpc.aio for gRPC, a
minimal keep-alive HTTP/1.1 client for HTTP (one connection per worker), so client costs do not
blur the comparison. Telemetry as shipped: no exporter configured, so no spans; metrics on. The table goes to stdout and
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

from bench.support import healthy, instant_sim, start, stop
from services.kit.net import free_port
from tests.support.suite_config import ADMIN_KEY, write_test_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TICKS = os.sysconf("SC_CLK_TCK")
SYSTEM = "You are a support agent for an online shop. Answer in two sentences."
QUESTION = "How do I reset my password if I no longer have access to my email?"


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) and of the children it runs."""
    total = 0.0
    for member in [pid, *_descendants(pid)]:
        with contextlib.suppress(FileNotFoundError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(FileNotFoundError):
            for child in (task / "children").read_text().split():
                found += [int(child), *_descendants(int(child))]
    return found


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client: one connection, one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        reused = self._writer is not None and not self._writer.is_closing()
        try:
            return await self._post(path, body, headers)
        except (asyncio.IncompleteReadError, ConnectionError):
            if not reused:
                raise
            # The server closed the idle keep-alive connection meanwhile: once more on a new one.
            await self.close()
            return await self._post(path, body, headers)

    async def _post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
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
            self._writer = None


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


LITELLM_KEY = "sk-ballast-bench-" + secrets.token_hex(16)


def _start_litellm(
    executable: str, sim_port: int, port: int, folder: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    config = folder / "litellm.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_list": [
                    {
                        "model_name": "sim-small",
                        "litellm_params": {
                            "model": "openai/sim-small-1",
                            "api_base": f"http://127.0.0.1:{sim_port}/v1",
                            "api_key": "sk-sim",
                        },
                    }
                ],
                "litellm_settings": {"drop_params": True},
            }
        )
    )
    litellm_env = {
        **env,
        "LITELLM_MASTER_KEY": LITELLM_KEY,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
    }
    command = [
        executable,
        "--config",
        str(config),
        "--port",
        str(port),
        "--num_workers",
        "1",
        "--telemetry",
        "False",
    ]
    return start(command, litellm_env, folder / "litellm.log")


async def _run(
    requests: int, rounds: int, concurrencies: list[int], folder: Path, litellm: str | None
) -> list[dict[str, Any]]:
    environ = write_test_config(folder, sim_latency_ms=0.0)
    sim_port = free_port()
    _catalog(folder, environ, sim_port)
    ports = {name: free_port() for name in ("edge", "router", "limiter", "cache", "sessions")}
    http_port = free_port()
    # The default set-up: no OTEL_* variable, so no exporter and no spans, metrics on (as served).
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        **environ,
        "BALLAST_LOG_LEVEL": "warning",
        "BALLAST_EDGE_HTTP_PORT": str(http_port),
        "BALLAST_EDGE_MAX_IN_FLIGHT": "4096",
    }
    for name, port in ports.items():
        env[f"BALLAST_{name.upper()}_PORT"] = str(port)
        env[f"BALLAST_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
        env[f"BALLAST_{name.upper()}_METRICS_PORT"] = str(free_port())
    sim = start(instant_sim(sim_port), env, folder / "sim.log")
    suite = start([sys.executable, "-m", "services.cli", "up"], env, folder / "suite.log")
    processes = [suite, sim]
    litellm_port = free_port()
    litellm_process = None
    if litellm:
        litellm_process = _start_litellm(litellm, sim_port, litellm_port, folder, env)
        processes.append(litellm_process)
    rows: list[dict[str, Any]] = []
    try:
        for port in ports.values():
            await healthy(f"127.0.0.1:{port}")
        await _tcp_ready(http_port)
        await _tcp_ready(sim_port)
        if litellm:
            await _tcp_ready(litellm_port, within=180)
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
            litellm_body = orjson.dumps(
                {
                    "model": "sim-small",
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": QUESTION},
                    ],
                }
            )
            litellm_headers = {"authorization": f"Bearer {LITELLM_KEY}"}
            for concurrency in concurrencies:
                http_clients = [RawHttp("127.0.0.1", http_port) for _ in range(concurrency)]
                sim_clients = [RawHttp("127.0.0.1", sim_port) for _ in range(concurrency)]
                litellm_clients = [RawHttp("127.0.0.1", litellm_port) for _ in range(concurrency)]

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

                async def litellm_call(slot: int, clients: list[RawHttp] = litellm_clients) -> None:
                    status, body = await clients[slot].post(
                        "/v1/chat/completions", litellm_body, litellm_headers
                    )
                    if status != 200:
                        raise RuntimeError(f"LiteLLM answered {status}: {body[:200]!r}")

                faces: list[tuple[str, Callable[[int], Awaitable[None]], int | None]] = [
                    ("direct", direct_call, None),
                    ("grpc", grpc_call, suite.pid),
                    ("http", http_call, suite.pid),
                ]
                if litellm_process is not None:
                    faces.append(("litellm", litellm_call, litellm_process.pid))
                # Warm-up: connections, caches of the interpreter, the router's EWMA.
                for _, call, _ in faces:
                    await _round(call, min(200, requests), concurrency, None)
                measured: dict[str, list[dict[str, float]]] = {face: [] for face, _, _ in faces}
                for _ in range(rounds):
                    for face, call, pid in faces:
                        measured[face].append(await _round(call, requests, concurrency, pid))
                for client in (*http_clients, *sim_clients, *litellm_clients):
                    await client.close()

                def median(
                    face: str, metric: str, measured: dict[str, list[dict[str, float]]] = measured
                ) -> float:
                    return statistics.median(r[metric] for r in measured[face])

                direct_p50, direct_p99 = median("direct", "p50_ms"), median("direct", "p99_ms")
                for face in [name for name, _, _ in faces if name != "direct"]:
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
                grpc_row, http_row = (r for r in rows[-len(faces) + 1 :] if r["face"] in ("grpc", "http"))
                print(
                    f"  concurrency {concurrency}: the HTTP face costs {http_row['cpu_ms'] - grpc_row['cpu_ms']:+.3f} ms "
                    f"CPU per request against gRPC Chat",
                    flush=True,
                )
    finally:
        stop(processes)
    return rows


HEADER = (
    "| conc | face | CPU ms/req (median; rounds) | p50 ms | p99 ms | added p50 ms | added p99 ms | provider p50 / p99 ms |\n"
    "|---:|---|---:|---:|---:|---:|---:|---:|"
)


def _row(r: dict[str, Any]) -> str:
    rounds = ", ".join(f"{c:.3f}" for c in r["cpu_ms_rounds"])
    name = {"grpc": "gRPC Chat", "http": "HTTP /v1/chat/completions", "litellm": "LiteLLM proxy"}[r["face"]]
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
    parser.add_argument("--litellm", default="", help="path to a `litellm` executable to measure beside")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="ballast-openai-http-"))
    print(HEADER, flush=True)
    rows = asyncio.run(_run(args.requests, args.rounds, concurrencies, folder, args.litellm or None))
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load {os.getloadavg()[0]:.1f} at the end"
    )
    if args.litellm:
        version = subprocess.run([args.litellm, "--version"], capture_output=True, text=True, check=False)
        machine += "; " + (version.stdout.strip().splitlines() or ["LiteLLM (version unknown)"])[-1]
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    summary = []
    for concurrency in concurrencies:
        by_face = {r["face"]: r for r in rows if r["concurrency"] == concurrency}
        summary.append(
            f"- concurrency {concurrency}: HTTP face {by_face['http']['cpu_ms'] - by_face['grpc']['cpu_ms']:+.3f} ms "
            f"CPU per request against gRPC Chat (aim: at most +0.3 ms)"
        )
        if "litellm" in by_face:
            summary.append(
                f"- concurrency {concurrency}: a routing-only request costs {by_face['http']['cpu_ms']:.2f} ms of CPU "
                f"through Ballast's HTTP face (every service) and {by_face['litellm']['cpu_ms']:.2f} ms through "
                f"LiteLLM's proxy: {by_face['http']['cpu_ms'] / by_face['litellm']['cpu_ms']:.2f} of it "
                "(aim: at most 0.2)"
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "openai_http.md").write_text(
        "# OpenAI-compatible HTTP face against gRPC Chat\n\n"
        f"{stamp}; {machine}; `python -m bench.openai_http --requests {args.requests} --rounds {args.rounds} "
        f"--concurrency {args.concurrency}{' --litellm …' if args.litellm else ''}`. Routing-only chat turns (cache bypassed, no session) through "
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
