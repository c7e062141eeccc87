"""Resident memory of the cache service with the local embedder, old code and new side by side.

Run: .venv/bin/python -m bench.cache_memory [--entries 2000] [--baseline main]
Writes bench/results/cache_memory.{md,json}.

Each variant runs as its own `python -m services.cache` process (memory store, metrics off, a
free loopback port): the working tree, and the `--baseline` git ref exported with `git archive`
into a temporary directory (same virtualenv, so same libraries). RSS (VmRSS of /proc) is read
when the port first answers health, after the model has loaded (health SERVING and one
semantic Lookup answered), and after storing N distinct answers through gRPC; the peak (VmHWM)
at the end. The variants run one after the other, so they do not compete for memory.
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
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from ballast.cache.v1 import cache_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.unit.cache.helpers import lookup, store

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# Generous: model load on a shared 2-core machine can take tens of seconds.
WAIT_SECONDS = 300.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


async def _wait_health(stub: health_pb2_grpc.HealthStub, *, serving: bool) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            if not serving or reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the cache never answered health")
        await asyncio.sleep(0.1)


async def measure(tree: Path, entries: int) -> dict[str, Any]:
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "BALLAST_CACHE_PORT": str(port),
        "BALLAST_CACHE_STORE": "memory://",
        "BALLAST_CACHE_FILE": str(tree / "config" / "cache.yaml"),
        "BALLAST_METRICS": "false",
        "OTEL_SDK_DISABLED": "true",
        "BALLAST_LOG_LEVEL": "warning",
    }
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "services.cache", cwd=tree, env=env)
    out: dict[str, Any] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            started = time.perf_counter()
            await _wait_health(health, serving=False)
            out["rss_started_mb"] = _mb(_status_kb(proc.pid, "VmRSS"))
            await _wait_health(health, serving=True)
            cache = cache_pb2_grpc.CacheServiceStub(channel)
            # The old code reports SERVING before loading: a semantic call waits for the model.
            await cache.Lookup(lookup("warm up the embedder", namespace="bench"), timeout=WAIT_SECONDS)
            out["seconds_to_model"] = round(time.perf_counter() - started, 1)
            out["rss_model_mb"] = _mb(_status_kb(proc.pid, "VmRSS"))
            for i in range(entries):
                question = f"question number {i}: how do I configure feature {i * 7919 % 10007}?"
                await cache.Store(store(question, f"answer {i} " * 20, namespace="bench"), timeout=60)
            out["rss_entries_mb"] = _mb(_status_kb(proc.pid, "VmRSS"))
            # Follow-ups, each in its own conversation: one small partition (and index) each.
            for i in range(entries):
                history = [(f"tell me about product {i}", f"product {i} is a widget")]
                await cache.Store(
                    store("how much does it cost?", f"{i} dollars", history=history, namespace="bench"),
                    timeout=60,
                )
            out["rss_conversations_mb"] = _mb(_status_kb(proc.pid, "VmRSS"))
            out["rss_peak_mb"] = _mb(_status_kb(proc.pid, "VmHWM"))
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout=60)
    return out


def export(ref: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    tar_path = into / "tree.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--baseline", default="main", help="git ref to compare against ('' for none)")
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            results[f"baseline ({args.baseline})"] = await measure(
                export(args.baseline, Path(tmp)), args.entries
            )
        results["this tree"] = await measure(ROOT, args.entries)
    columns = [
        ("rss_started_mb", "RSS at port open (MB)"),
        ("rss_model_mb", "RSS after model load (MB)"),
        ("rss_entries_mb", f"RSS after {args.entries} entries (MB)"),
        ("rss_conversations_mb", f"+ {args.entries} follow-ups in as many conversations (MB)"),
        ("rss_peak_mb", "peak RSS (MB)"),
        ("seconds_to_model", "s to first semantic answer"),
    ]
    md = [
        "# Cache service memory (bench/cache_memory.py)",
        "",
        f"Machine: {platform.machine()}, Python {platform.python_version()}; local MiniLM int8 "
        f"embedder, memory store, {args.entries} stored answers. Target: <= 150 MB resident.",
        "",
        "| variant | " + " | ".join(title for _, title in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, row in results.items():
        md.append(f"| {name} | " + " | ".join(str(row[key]) for key, _ in columns) + " |")
    text = "\n".join(md) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cache_memory.md").write_text(text)
    (RESULTS / "cache_memory.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
