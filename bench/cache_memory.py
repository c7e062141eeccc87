"""Resident memory of the cache service with the local embedder, old code and new side by side.

Run: .venv/bin/python -m bench.cache_memory [--entries 2000] [--baseline main] [--rounds 2]
    [--variant 'label:VAR=VALUE,VAR=VALUE' ...]
Writes bench/results/cache_memory.{md,json}.

Each variant runs as its own `python -m services.cache` process (memory store, a free loopback
port, telemetry as shipped: no OTEL_* variable, so no spans and metrics on with their Prometheus
endpoint): the working tree, and the `--baseline` git ref exported with `git archive` into a
temporary directory (same virtualenv, so same libraries; its own generated stubs, gen/, first on
the path, since the editable install maps `ballast` to this tree's). `--variant` adds runs of this
tree with extra environment variables. RSS (VmRSS of /proc) is read when the port first answers
health, after the model has loaded (health SERVING and one semantic Lookup answered), and after
storing N distinct answers through gRPC; the peak (VmHWM) at the end, and smaps_rollup's split of
the final RSS into anonymous memory and mapped files. Variants run one at a time, so they do not
compete for memory, alternating round by round; the table gives each variant's median.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
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


def _rollup_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0])
    return fields


async def measure(tree: Path, entries: int, extra_env: dict[str, str]) -> dict[str, Any]:
    port = _free_port()
    env = {
        # Telemetry as shipped: an OTEL_* variable of the caller's shell would change it.
        **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "BALLAST_", "MALLOC_"))},
        # The tree's own generated stubs first: the editable install maps `ballast` to this tree's.
        "PYTHONPATH": os.pathsep.join([str(tree), str(tree / "gen")]),
        "BALLAST_CACHE_PORT": str(port),
        # Metrics on as shipped, on a free port (the default one may be taken by another suite).
        "BALLAST_CACHE_METRICS_PORT": str(_free_port()),
        "BALLAST_CACHE_STORE": "memory://",
        "BALLAST_CACHE_FILE": str(tree / "config" / "cache.yaml"),
        "BALLAST_LOG_LEVEL": "warning",
        **extra_env,
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
            rollup = _rollup_kb(proc.pid)
            out["rss_anonymous_mb"] = _mb(rollup["Anonymous"])
            out["rss_files_mb"] = _mb(rollup["Rss"] - rollup["Anonymous"])
    finally:
        if proc.returncode is None:
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


def _variant(spec: str) -> tuple[str, dict[str, str]]:
    """'label:VAR=VALUE,VAR=VALUE' -> (label, {VAR: VALUE})."""
    label, _, assignments = spec.partition(":")
    env = {}
    for assignment in filter(None, assignments.split(",")):
        name, equals, value = assignment.partition("=")
        if not equals:
            raise SystemExit(f"--variant {spec!r}: expected VAR=VALUE, got {assignment!r}")
        env[name] = value
    return label or spec, env


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--baseline", default="main", help="git ref to compare against ('' for none)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant, alternating")
    parser.add_argument(
        "--variant", action="append", default=[], help="'label:VAR=VALUE,...': this tree with extra variables"
    )
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        variants: list[tuple[str, Path, dict[str, str]]] = []
        if args.baseline:
            variants.append((f"baseline ({args.baseline})", export(args.baseline, Path(tmp)), {}))
        variants.append(("this tree", ROOT, {}))
        for spec in args.variant:
            label, env = _variant(spec)
            variants.append((label, ROOT, env))
        for _ in range(args.rounds):
            for name, tree, env in variants:
                row = await measure(tree, args.entries, env)
                print(name, row, flush=True)
                runs.setdefault(name, []).append(row)
                loads.append(os.getloadavg()[0])
    results = {
        name: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for name, rows in runs.items()
    }
    columns = [
        ("rss_started_mb", "RSS at port open (MB)"),
        ("rss_model_mb", "RSS after model load (MB)"),
        ("rss_entries_mb", f"RSS after {args.entries} entries (MB)"),
        ("rss_conversations_mb", f"+ {args.entries} follow-ups in as many conversations (MB)"),
        ("rss_peak_mb", "peak RSS (MB)"),
        ("rss_anonymous_mb", "of the last: anonymous (MB)"),
        ("rss_files_mb", "of the last: mapped files (MB)"),
        ("seconds_to_model", "s to first semantic answer"),
    ]
    md = [
        "# Cache service memory (bench/cache_memory.py)",
        "",
        f"Machine: {platform.machine()}, Python {platform.python_version()}; local MiniLM int8 "
        f"embedder, memory store, telemetry as shipped (metrics on, no OTEL_* variable), "
        f"{args.entries} stored answers. Target: <= 150 MB resident. Medians of {args.rounds} "
        f"rounds, variants alternating; load average {min(loads):.1f}-{max(loads):.1f} while measuring.",
        "",
        f"Command: `.venv/bin/python -m bench.cache_memory {' '.join(sys.argv[1:])}`",
        "",
        "| variant | " + " | ".join(title for _, title in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, row in results.items():
        md.append(f"| {name} | " + " | ".join(str(round(row[key], 1)) for key, _ in columns) + " |")
    text = "\n".join(md) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cache_memory.md").write_text(text)
    report = {"load_average": [round(x, 2) for x in loads], "medians": results, "runs": runs}
    (RESULTS / "cache_memory.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
