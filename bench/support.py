"""What several benchmarks do the same way: start and stop the suite's processes, wait until a
service is SERVING, the command line of a zero-latency SIMULATED provider, and writing a
result's table and data under bench/results."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def save_results(name: str, text: str, data: Any) -> None:
    """bench/results/<name>.md (the printed report) and <name>.json (what it was made from)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")


def instant_sim(port: int, name: str = "sim-bench") -> list[str]:
    """`python -m services.router.sim` answering at once: what is measured is Ballast, not it."""
    return [
        sys.executable, "-m", "services.router.sim", "--port", str(port), "--name", name,
        "--latency-ms", "0", "--p99-ms", "0", "--distribution", "fixed", "--tokens-per-second", "0",
    ]  # fmt: skip


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A process of the benchmark, run from the repository root, its output appended to `log`."""
    handle = log.open("ab")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=handle, stderr=handle)


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each (they drain), then SIGKILL to any still running after 30 s."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


async def healthy(address: str, within: float = 180.0) -> None:
    """Waits until the gRPC health service at `address` answers SERVING."""
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
