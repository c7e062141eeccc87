"""What mutual TLS between services costs: per call on a kept-alive connection, and per new
connection (the handshake).

    .venv/bin/python -m bench.tls_overhead [--calls 3000] [--connections 200] [--rounds 3]

Starts the limiter twice in this process (the kit's real server, interceptors included):
plaintext, and with mutual TLS from certificates `ballast certs` makes in a temporary folder
(ECDSA P-256). The client is a Ballast channel in the same process, so `CPU µs/call` is client
and server together (process CPU time over the run divided by the calls). The call is
grpc.health.v1/Check on the main port, the smallest RPC, so the table shows TLS's own cost
rather than a service's work. Plaintext and mTLS alternate, round by round, so both see the
same machine. Results go to bench/results/tls_overhead.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit import tls
from services.testing import Suite, start_suite

RESULTS = Path(__file__).resolve().parent / "results"
REQUEST = health_pb2.HealthCheckRequest()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _open(suite: Suite) -> grpc.aio.Channel:
    address = suite.address("limiter")
    if suite.client_tls is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, tls.channel_credentials(suite.client_tls))


async def _calls(suite: Suite, calls: int, concurrency: int) -> dict[str, float]:
    async with _open(suite) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        await check(REQUEST)  # the handshake is not part of the per-call cost
        latencies: list[float] = []
        remaining = calls

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                await check(REQUEST)
                latencies.append(time.perf_counter() - started)

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {
        "p50_ms": _percentile(latencies, 0.5) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
        "calls_per_s": len(latencies) / wall,
        "cpu_us_per_call": cpu / len(latencies) * 1e6,
    }


async def _connections(suite: Suite, count: int) -> dict[str, float]:
    """A new channel, its first call, closed: what a client pays to connect."""
    times: list[float] = []
    cpu = time.process_time()
    for _ in range(count):
        started = time.perf_counter()
        async with _open(suite) as channel:
            await health_pb2_grpc.HealthStub(channel).Check(REQUEST)
        times.append(time.perf_counter() - started)
    cpu = time.process_time() - cpu
    return {
        "connect_p50_ms": _percentile(times, 0.5) * 1000,
        "connect_cpu_us": cpu / count * 1e6,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="ballast-tls-bench-"))
    environ = {"BALLAST_LOG_LEVEL": "warning", "BALLAST_METRICS": "false"}
    suites = {
        "plaintext": await start_suite(["limiter"], environ),
        "mtls": await start_suite(["limiter"], environ, tls_dir=folder / "certs"),
    }
    rows: list[dict[str, Any]] = []
    try:
        for round_index in range(args.rounds):
            for concurrency in args.concurrency:
                for mode, suite in suites.items():
                    result = await _calls(suite, args.calls, concurrency)
                    rows.append(
                        {"round": round_index + 1, "mode": mode, "concurrency": concurrency, **result}
                    )
            for mode, suite in suites.items():
                result = await _connections(suite, args.connections)
                rows.append({"round": round_index + 1, "mode": mode, "concurrency": 0, **result})
    finally:
        for suite in suites.values():
            await suite.stop(0)
    return {"rows": rows}


def _median(rows: list[dict[str, Any]], mode: str, concurrency: int, key: str) -> float:
    return float(
        statistics.median(r[key] for r in rows if r["mode"] == mode and r["concurrency"] == concurrency)
    )


def _range(rows: list[dict[str, Any]], mode: str, concurrency: int, key: str, digits: int) -> str:
    values = [r[key] for r in rows if r["mode"] == mode and r["concurrency"] == concurrency]
    return f"{min(values):.{digits}f}–{max(values):.{digits}f}"


def markdown(data: dict[str, Any], args: argparse.Namespace) -> str:
    rows = data["rows"]
    load = os.getloadavg()[0]
    lines = [
        "# Mutual TLS between services: cost per call and per connection",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load {load:.1f} at the end. The limiter's real server and a client in one process "
        f"(grpc.health.v1/Check on the main port); {args.calls} calls per run, {args.rounds} rounds "
        "alternating plaintext and mTLS; ranges are over the rounds.",
        "",
        "| concurrency | plaintext p50 ms | mTLS p50 ms | plaintext calls/s | mTLS calls/s "
        "| plaintext CPU µs/call | mTLS CPU µs/call | added CPU µs/call (median) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for concurrency in args.concurrency:
        added = _median(rows, "mtls", concurrency, "cpu_us_per_call") - _median(
            rows, "plaintext", concurrency, "cpu_us_per_call"
        )
        lines.append(
            f"| {concurrency} | {_range(rows, 'plaintext', concurrency, 'p50_ms', 3)} "
            f"| {_range(rows, 'mtls', concurrency, 'p50_ms', 3)} "
            f"| {_range(rows, 'plaintext', concurrency, 'calls_per_s', 0)} "
            f"| {_range(rows, 'mtls', concurrency, 'calls_per_s', 0)} "
            f"| {_range(rows, 'plaintext', concurrency, 'cpu_us_per_call', 0)} "
            f"| {_range(rows, 'mtls', concurrency, 'cpu_us_per_call', 0)} | {added:.0f} |"
        )
    lines += [
        "",
        f"A new connection (channel, first call, close; {args.connections} in a row): plaintext "
        f"{_range(rows, 'plaintext', 0, 'connect_p50_ms', 2)} ms p50 and "
        f"{_range(rows, 'plaintext', 0, 'connect_cpu_us', 0)} µs CPU; mTLS "
        f"{_range(rows, 'mtls', 0, 'connect_p50_ms', 2)} ms p50 and "
        f"{_range(rows, 'mtls', 0, 'connect_cpu_us', 0)} µs CPU (both handshakes, ECDSA P-256). "
        "Ballast's channels stay open, so a service pays the handshake once per replica it calls "
        "(and again after a reconnect).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_overhead", description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    args = parser.parse_args()
    data = asyncio.run(run(args))
    text = markdown(data, args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tls_overhead.json").write_text(json.dumps(data, indent=2))
    (RESULTS / "tls_overhead.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
