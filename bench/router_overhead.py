"""What the router adds on top of a direct HTTP call to the provider it routes to.

    .venv/bin/python -m bench.router_overhead [--requests 1000] [--concurrency 1,16,64] [--seconds 20]

Starts a SIMULATED provider (`python -m services.router.sim`, zero latency, instant tokens) and
the router (`python -m services.router`, catalog pointing at that sim) as two separate processes
on 127.0.0.1, then from this process, for each concurrency:
  direct   POST /v1/chat/completions to the sim with httpx (the body the router's adapter sends)
  router   RouterService.Complete over gRPC (validation, routing, adapter, cost, trail)
added = router - direct, per percentile. Non-streaming. The client is one Python process: from
concurrency 16 up, its own httpx pool limits the direct path (its tail grows faster than the
router's), so there the table shows throughput more than added latency. Each run stops after --requests calls or
--seconds, whichever comes first. Results go to bench/results/router_overhead.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
from ballast.common.v1 import common_pb2
from ballast.router.v1 import router_pb2, router_pb2_grpc

from bench.support import instant_sim
from services.kit.net import free_port
from services.router.catalog import Model, Provider
from services.router.model import ChatRequest, Message, Role
from services.router.providers.openai import to_openai_body

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "Summarise the benefits of routing LLM calls through a gateway in one sentence."


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _measure(
    call: Callable[[], Awaitable[Any]], requests: int, concurrency: int, seconds: float
) -> dict[str, float]:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    remaining = iter(range(requests))

    async def worker() -> None:
        for _ in remaining:
            if time.perf_counter() > stop_at:
                return
            started = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "p50_ms": _percentile(latencies, 0.50),
        "p99_ms": _percentile(latencies, 0.99),
        "rps": len(latencies) / wall,
    }


CATALOG = """
providers:
  sim-bench:
    kind: sim          # an external SIMULATED provider (started by the benchmark)
    wire: openai
    base_url: http://127.0.0.1:{port}/v1
models:
  sim-bench-model:
    provider: sim-bench
    provider_model: sim-bench-1
    input_price_micros_per_mtok: 150000
    output_price_micros_per_mtok: 600000
aliases:
  budget: {{candidates: [sim-bench-model]}}
  reasoning: {{candidates: [sim-bench-model]}}
tier_defaults: {{default: budget}}
"""


async def _run(
    args: argparse.Namespace, sim_port: int, router_port: int
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    model = Model("sim-bench-model", "sim-bench", "sim-bench-1", 8192, 150_000, 600_000, 150_000)
    provider = Provider("sim-bench", "sim", f"http://127.0.0.1:{sim_port}/v1")
    body = json.dumps(
        to_openai_body(model, ChatRequest((Message(Role.USER, PROMPT),)), stream=False, provider=provider),
        separators=(",", ":"),
    ).encode()
    http = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{sim_port}/v1",
        headers={"content-type": "application/json"},
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=256),
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{router_port}")
    stub = router_pb2_grpc.RouterServiceStub(channel)
    request = router_pb2.CompleteRequest(
        model="budget", messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=PROMPT)]
    )

    async def direct() -> None:
        response = await http.post("/chat/completions", content=body)
        response.raise_for_status()
        response.json()

    floor_request = router_pb2.GetProviderStatusRequest(provider="sim-bench")

    async def floor() -> None:
        await stub.GetProviderStatus(floor_request, timeout=10)

    inside: list[float] = []  # the router's own measure of each call (CompleteResponse.latency)

    async def routed() -> None:
        reply = await stub.Complete(request, timeout=10)
        assert reply.simulated and reply.attempts[-1].outcome == router_pb2.ATTEMPT_OUTCOME_OK
        inside.append(reply.latency.ToNanoseconds() / 1e6)

    rows = []
    try:
        for _ in range(200):  # warm both paths (connections, caches)
            await direct()
            await routed()
            await floor()
        # The cost of any gRPC call to the router (interceptors, HTTP/2, protobuf), for scale.
        floor_row = await _measure(floor, args.requests, 1, args.seconds)
        print(
            f"  gRPC floor (GetProviderStatus, c=1) p50 {floor_row['p50_ms']:.3f} ms",
            file=sys.stderr,
            flush=True,
        )
        for concurrency in args.concurrency:
            # Warm at this concurrency first, so both pools hold enough open connections.
            await _measure(direct, concurrency * 10, concurrency, args.seconds)
            d = await _measure(direct, args.requests, concurrency, args.seconds)
            await _measure(routed, concurrency * 10, concurrency, args.seconds)
            inside.clear()
            r = await _measure(routed, args.requests, concurrency, args.seconds)
            r["inside_p50_ms"] = _percentile(inside, 0.50)
            rows.append(
                {
                    "concurrency": concurrency,
                    "direct": d,
                    "router": r,
                    "added_p50_ms": r["p50_ms"] - d["p50_ms"],
                    "added_p99_ms": r["p99_ms"] - d["p99_ms"],
                }
            )
            print(
                f"  c={concurrency:<3} direct p50 {d['p50_ms']:.3f} ms  router p50 {r['p50_ms']:.3f} ms  "
                f"added {rows[-1]['added_p50_ms']:.3f} ms (inside the router p50 {r['inside_p50_ms']:.3f} ms)",
                file=sys.stderr,
                flush=True,
            )
    finally:
        await http.aclose()
        await channel.close()
    return rows, floor_row


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| concurrency | direct p50 ms | direct p99 ms | direct req/s | router p50 ms | router p99 ms | router req/s "
        "| added p50 ms | added p99 ms | inside router p50 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        d, r = row["direct"], row["router"]
        lines.append(
            f"| {row['concurrency']} | {d['p50_ms']:.3f} | {d['p99_ms']:.3f} | {d['rps']:.0f} | {r['p50_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {r['rps']:.0f} | {row['added_p50_ms']:.3f} | {row['added_p99_ms']:.3f} | "
            f"{r['inside_p50_ms']:.3f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.router_overhead", description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=20.0, help="cap per measured run")
    args = parser.parse_args()
    sim_port, router_port = free_port(), free_port()
    env = {
        **os.environ,
        "OTEL_SDK_DISABLED": "true",
        "BALLAST_LOG_LEVEL": "warning",
        "BALLAST_ROUTER_PORT": str(router_port),
        "BALLAST_ROUTER_REPORT_HEADROOM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")]),
    }
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as folder:
        catalog = Path(folder) / "catalog.yaml"
        catalog.write_text(CATALOG.format(port=sim_port))
        env["BALLAST_ROUTER_CATALOG_FILE"] = str(catalog)
        try:
            processes.append(
                subprocess.Popen(instant_sim(sim_port), cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
            )
            _wait_port(sim_port)
            processes.append(subprocess.Popen([sys.executable, "-m", "services.router"], cwd=ROOT, env=env))
            _wait_port(router_port)
            rows, floor_row = asyncio.run(_run(args, sim_port, router_port))
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(10)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, load {os.getloadavg()[0]:.1f}"
    table = _table(rows)
    floor_text = (
        "`inside router` is the router's own measure of a call (CompleteResponse.latency: from routing "
        "to the answer, provider call included), to compare with `direct`. "
        f"For scale, a trivial RPC to the router (GetProviderStatus, no provider call) takes "
        f"{floor_row['p50_ms']:.3f} ms p50 / {floor_row['p99_ms']:.3f} ms p99 at concurrency 1 — the gRPC hop "
        "(client, kit interceptors, HTTP/2, protobuf) that any gRPC service in front of the provider adds."
    )
    print(table)
    print(floor_text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "router_overhead.json").write_text(
        json.dumps(
            {"machine": machine, "requests": args.requests, "seconds_cap": args.seconds, "rows": rows},
            indent=2,
        )
    )
    (RESULTS / "router_overhead.md").write_text(
        "# Router overhead (non-streaming, SIMULATED provider at zero latency)\n\n"
        f"Machine: {machine}. Sim, router and client are three processes on 127.0.0.1; up to "
        f"{args.requests} calls or {args.seconds:g} s per run.\n\n{table}\n\n{floor_text}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
