"""50 writers on ONE session, on PostgreSQL through gRPC: throughput and the worst wait.

    .venv/bin/python -m bench.sessions_contention [--writers 50] [--seconds 10]

Each scenario starts the sessions service as its own process (`python -m services.sessions`,
a fresh PostgreSQL schema from BALLAST_TEST_POSTGRES_DSN, default
postgresql://postgres@127.0.0.1:5432/test) and runs --writers clients in this process that
append one turn at a time, each with its own idempotency key, for --seconds:

  head             expected_version=-1 (the recommended path when turns do not depend on the
                   exact history): never conflicts.
  versioned        expected_version = the version the writer last saw, following the documented
                   behaviour: on ABORTED wait RetryInfo's delay and retry with ErrorInfo's
                   current_version and the same idempotency key. The service queues the
                   session's versioned writers in arrival order (BALLAST_SESSIONS_CONFLICT_QUEUE_*).
  versioned, no queue  the same clients against BALLAST_SESSIONS_CONFLICT_QUEUE_MAX=0 (how the
                   service answered before: ABORTED at once, every loser retries).
  versioned, no queue, backoff  the same, clients ignoring RetryInfo and backing off
                   exponentially with full jitter (1 ms doubling to 100 ms), as the issue measured.

"wait" is the time from an append's first attempt to its success; appends still unfinished when
the time is up count with the time they had waited so far. The machine is shared (2 cores, other
work running): compare the rows of one run, not absolute numbers across runs. Results go to
bench/results/sessions_contention.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg
import grpc
from ballast.common.v1 import common_pb2
from ballast.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
CALLER = common_pb2.Caller(tenant_id="bench", user_id="u1")
TEXT = "Which train from Lisbon arrives in Porto before ten tomorrow, and what does it cost?"


@dataclass
class Scenario:
    name: str
    expected_version: bool
    queue: bool
    follow_hint: bool = True


SCENARIOS = [
    Scenario("head (expected_version -1)", expected_version=False, queue=True),
    Scenario("versioned, documented retry", expected_version=True, queue=True),
    Scenario("versioned, no queue (before)", expected_version=True, queue=False),
    Scenario("versioned, no queue, exp. backoff", expected_version=True, queue=False, follow_hint=False),
]


@dataclass
class Tally:
    waits: list[float] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    aborted: int = 0
    errors: int = 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def _service(dsn: str, queue: bool) -> AsyncIterator[tuple[str, int]]:
    port = _free_port()
    env = {
        **os.environ,
        "BALLAST_SESSIONS_PORT": str(port),
        "BALLAST_SESSIONS_STORE": dsn,
        "BALLAST_SESSIONS_COMPACTION": "false",
        "BALLAST_METRICS": "false",
        "BALLAST_LOG_LEVEL": "warning",
        "OTEL_SDK_DISABLED": "true",
        "BALLAST_SESSIONS_CONFLICT_QUEUE_MAX": "1000" if queue else "0",
    }
    process = await asyncio.to_thread(
        subprocess.Popen, [sys.executable, "-m", "services.sessions"], cwd=ROOT, env=env
    )
    address = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = sessions_pb2_grpc.SessionsServiceStub(channel)
            deadline = time.monotonic() + 60
            while True:
                try:
                    await stub.ListSessions(sessions_pb2.ListSessionsRequest(caller=CALLER), timeout=2)
                    break
                except grpc.aio.AioRpcError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise RuntimeError("the sessions service did not start") from None
                    await asyncio.sleep(0.2)
        yield address, process.pid
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 30)


def _hint(exc: grpc.aio.AioRpcError) -> tuple[int, float | None]:
    status = rpc_status.from_call(exc)
    current, delay = -1, None
    for detail in status.details if status is not None else []:
        info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            current = int(info.metadata.get("current_version", "-1"))
        elif detail.Unpack(retry):
            delay = retry.retry_delay.ToNanoseconds() / 1e9
    return current, delay


async def _writer(
    stub: Any, who: int, scenario: Scenario, stop_at: float, tally: Tally, pending: dict[int, float]
) -> None:
    rng = random.Random(who)
    version = 0
    n = 0
    while time.monotonic() < stop_at:
        n += 1
        request = sessions_pb2.AppendTurnsRequest(
            caller=CALLER,
            session_id="s1",
            idempotency_key=f"w{who}-{n}",
            turns=[
                sessions_pb2.Turn(message=common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=TEXT))
            ],
        )
        started = time.monotonic()
        pending[who] = started
        attempts, backoff = 0, 0.001
        while time.monotonic() < stop_at:
            attempts += 1
            request.expected_version = version if scenario.expected_version else -1
            try:
                reply = await stub.AppendTurns(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.ABORTED:
                    tally.errors += 1
                    await asyncio.sleep(0.05)
                    continue
                tally.aborted += 1
                current, delay = _hint(exc)
                version = current if current >= 0 else version
                if scenario.follow_hint and delay is not None:
                    await asyncio.sleep(delay)
                else:
                    await asyncio.sleep(rng.random() * backoff)
                    backoff = min(backoff * 2, 0.1)
                continue
            version = reply.session.version
            tally.waits.append(time.monotonic() - started)
            tally.attempts.append(attempts)
            pending.pop(who, None)
            break


async def _scenario(base: str, scenario: Scenario, writers: int, seconds: float) -> dict[str, Any]:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(base)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    dsn = f"{base}{'&' if '?' in base else '?'}{urlencode({'search_path': schema})}"
    try:
        async with (
            _service(dsn, scenario.queue) as (address, pid),
            grpc.aio.insecure_channel(address) as channel,
        ):
            stub = sessions_pb2_grpc.SessionsServiceStub(channel)
            await stub.CreateSession(sessions_pb2.CreateSessionRequest(caller=CALLER, session_id="warm"))
            for _ in range(50):  # connections and prepared statements
                await stub.AppendTurns(
                    sessions_pb2.AppendTurnsRequest(
                        caller=CALLER,
                        session_id="warm",
                        expected_version=-1,
                        turns=[
                            sessions_pb2.Turn(
                                message=common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="w")
                            )
                        ],
                    )
                )
            await stub.CreateSession(sessions_pb2.CreateSessionRequest(caller=CALLER, session_id="s1"))
            tally, pending = Tally(), dict[int, float]()
            cpu_before = _cpu_seconds(pid)
            began = time.monotonic()
            stop_at = began + seconds
            await asyncio.gather(
                *(_writer(stub, i, scenario, stop_at, tally, pending) for i in range(writers))
            )
            elapsed = time.monotonic() - began
            server_cpu = _cpu_seconds(pid) - cpu_before
            unfinished = [stop_at - t for t in pending.values()]
            session = await stub.GetSession(sessions_pb2.GetSessionRequest(caller=CALLER, session_id="s1"))
    finally:
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()
    waits = tally.waits
    done = len(waits)
    assert session.session.version == done, "every acknowledged append is stored exactly once"
    ordered = sorted(waits) or [0.0]
    return {
        "scenario": scenario.name,
        "appends": done,
        "throughput": done / elapsed,
        "wait_p50_ms": statistics.median(ordered) * 1e3,
        "wait_p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3,
        "wait_max_ms": max([*ordered, *unfinished]) * 1e3,
        "unfinished": len(unfinished),
        "attempts_per_append": (sum(tally.attempts) / done) if done else 0.0,
        "max_attempts": max(tally.attempts, default=0),
        "aborted": tally.aborted,
        # Server CPU per acknowledged append: the cost of the retries the clients make.
        "server_cpu_ms_per_append": (server_cpu * 1e3 / done) if done else 0.0,
        "errors": tally.errors,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = os.environ.get("BALLAST_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    load_before = os.getloadavg()[0]
    rows = []
    for scenario in SCENARIOS:
        rows.append(await _scenario(base, scenario, args.writers, args.seconds))
        print(f"  {rows[-1]['scenario']}: {rows[-1]['throughput']:.0f}/s", file=sys.stderr)
    return {
        "writers": args.writers,
        "seconds": args.seconds,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    head = result["rows"][0]["throughput"]
    lines = [
        f"{result['writers']} writers on one session, {result['seconds']:g} s each, sessions service"
        f" on PostgreSQL through gRPC ({result['machine']}; load average"
        f" {result['load_average'][0]:g} before, {result['load_average'][1]:g} after)",
        "",
        "| writers | appends/s | vs head | wait p50 ms | wait p99 ms | worst wait ms | attempts/append"
        " | max attempts | unfinished | server CPU ms/append |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['scenario']} | {row['throughput']:.0f} | {row['throughput'] / head:.2f}x"
            f" | {row['wait_p50_ms']:.1f} | {row['wait_p99_ms']:.1f} | {row['wait_max_ms']:.0f}"
            f" | {row['attempts_per_append']:.2f} | {row['max_attempts']} | {row['unfinished']}"
            f" | {row['server_cpu_ms_per_append']:.2f} |"
        )
    lines += [
        "",
        "Command: `.venv/bin/python -m bench.sessions_contention"
        f" --writers {result['writers']} --seconds {result['seconds']:g}`.",
        "wait = first attempt to success of one append (unfinished appends count with their wait so"
        " far); attempts/append includes that success.",
        "A versioned writer on a contended session needs the new version before it may append, so"
        " each versioned append costs one client round trip after the previous one, in series; head"
        " appends from many writers overlap. The queue makes that one round trip the only cost"
        " (at most one ABORTED per append, no writer overtaken); without it writers retry blindly.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--writers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    if args.writers < 1 or args.seconds <= 0:
        parser.error("--writers must be 1 or more and --seconds more than 0")
    result = asyncio.run(run(args))
    text = table(result)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sessions_contention.md").write_text(text + "\n")
    (RESULTS / "sessions_contention.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
