"""The router's provider transport against the library it replaces, side by side in one run.

    .venv/bin/python -m bench.provider_transport [--requests 2000] [--rounds 4] [--concurrency 1,16]

services/router/providers/network.py (`Http11Transport`, HTTP/1.1 on asyncio, http11.py) replaced
httpx's default transport (httpcore) to cut the router's CPU per provider call. This measures
whether that still pays, with whatever httpx/httpcore versions are installed: the same
ProviderClient, the same request body, against one SIMULATED provider process (zero latency,
instant tokens) on 127.0.0.1, alternating the two transports round by round (this machine's
speed drifts), and reports this process's CPU per call (time.process_time) and latency.
Non-streaming calls, as the router makes for Complete. Results: bench/results/provider_transport.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpcore
import httpx

from bench.router_overhead import PROMPT, _percentile, _wait_port
from bench.support import instant_sim
from services.kit.net import free_port
from services.router.catalog import Model, Provider
from services.router.model import ChatRequest, Message, Role
from services.router.providers.base import ProviderClient, endpoint_url
from services.router.providers.network import Http11Transport
from services.router.providers.openai import to_openai_body

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def _transports(limits: httpx.Limits) -> dict[str, Callable[[], httpx.AsyncBaseTransport]]:
    return {
        "network.Http11Transport (ours)": lambda: Http11Transport(limits=limits),
        f"httpx default (httpcore {httpcore.__version__})": lambda: httpx.AsyncHTTPTransport(limits=limits),
    }


async def _round(
    make: Callable[[], httpx.AsyncBaseTransport], url: httpx.URL, body: bytes, requests: int, concurrency: int
) -> dict[str, float]:
    client = ProviderClient(make(), {"content-type": "application/json"}, httpx.Timeout(30.0))
    try:
        for _ in range(concurrency * 4):  # warm the pool: connections are not what is measured
            (await client.post(url, body)).json()
        latencies: list[float] = []
        remaining = iter(range(requests))

        async def worker() -> None:
            for _ in remaining:
                started = time.perf_counter()
                response = await client.post(url, body)
                response.raise_for_status()
                response.json()
                latencies.append((time.perf_counter() - started) * 1000)

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await client.aclose()
    return {
        "cpu_ms_per_call": cpu / len(latencies) * 1000,
        "p50_ms": _percentile(latencies, 0.5),
        "p99_ms": _percentile(latencies, 0.99),
        "rps": len(latencies) / wall,
    }


async def _run(args: argparse.Namespace, port: int) -> list[dict[str, object]]:
    model = Model("sim-bench-model", "sim-bench", "sim-bench-1", 8192, 150_000, 600_000, 150_000)
    provider = Provider("sim-bench", "sim", f"http://127.0.0.1:{port}/v1")
    body = json.dumps(
        to_openai_body(model, ChatRequest((Message(Role.USER, PROMPT),)), stream=False, provider=provider),
        separators=(",", ":"),
    ).encode()
    url = endpoint_url(provider, "/chat/completions")
    rows: list[dict[str, object]] = []
    for concurrency in args.concurrency:
        limits = httpx.Limits(max_connections=max(concurrency, 1), max_keepalive_connections=concurrency)
        transports = _transports(limits)
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in transports}
        for round_number in range(args.rounds):
            # Alternate which goes first, so neither always meets a warmer or cooler machine.
            order = list(transports) if round_number % 2 == 0 else list(reversed(transports))
            for name in order:
                samples[name].append(await _round(transports[name], url, body, args.requests, concurrency))
        for name, runs in samples.items():
            rows.append(
                {
                    "transport": name,
                    "concurrency": concurrency,
                    **{key: statistics.median(r[key] for r in runs) for key in runs[0]},
                    "cpu_ms_per_call_rounds": [round(r["cpu_ms_per_call"], 4) for r in runs],
                }
            )
    return rows


def _table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| transport | concurrency | client CPU per call (ms, median) | per round | p50 ms | p99 ms | calls/s |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['transport']} | {r['concurrency']} | {r['cpu_ms_per_call']:.3f} | "
            f"{', '.join(f'{v:.3f}' for v in r['cpu_ms_per_call_rounds'])} | "  # type: ignore[attr-defined]
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['rps']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.provider_transport", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="calls per round and transport")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    args = parser.parse_args()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")])}
    sim = subprocess.Popen(instant_sim(port), cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        _wait_port(port)
        rows = asyncio.run(_run(args, port))
    finally:
        sim.terminate()
        sim.wait(timeout=10)
    header = (
        f"Provider transport A/B ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} cores; "
        f"httpx {httpx.__version__}, httpcore {httpcore.__version__}; SIMULATED provider; "
        f"{args.rounds} alternating rounds of {args.requests} calls)"
    )
    text = f"{header}\n\n{_table(rows)}\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "provider_transport.md").write_text(f"# {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
