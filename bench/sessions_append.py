"""Sessions on PostgreSQL: append and GetContext latency at turn 1 and at turn 1,000.

    .venv/bin/python -m bench.sessions_append [--turns 1000] [--window 200] [--samples 200]
                                               [--concurrency 16] [--seconds 3]

Starts the sessions service in this process on 127.0.0.1 with a fresh PostgreSQL schema
(BALLAST_TEST_POSTGRES_DSN, default postgresql://postgres@127.0.0.1:5432/test), grows ONE
session to --turns turns, one AppendTurns call per turn (~35 tokens each, idempotency key and
expected_version=-1, as the edge sends them), then:
  1. times --window appends at turn 1 (a new session each) interleaved with the last --window
     appends of the long session, so that the shared machine's noise hits both series alike;
  2. times GetContext(budget 4,000 tokens) --samples times, interleaved, on a session at turn 1,
     one at turn --window (its window already full) and the long one;
  3. measures bytes stored per turn as the pg_total_relation_size growth of the service's
     tables over the first --window turns and over --window turns after --turns;
  4. measures throughput: --concurrency clients appending to their own sessions (then calling
     GetContext) for --seconds each.
Client and server share one Python process on a shared 2-core machine, so absolute numbers
are pessimistic. Results go to bench/results/sessions_append.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg
from ballast.common.v1 import common_pb2
from ballast.sessions.v1 import sessions_pb2

from services.testing import Suite, start_suite

RESULTS = Path(__file__).resolve().parent / "results"
CALLER = common_pb2.Caller(tenant_id="bench", user_id="u1")
SIZE_SQL = (
    "SELECT pg_total_relation_size('sessions') + pg_total_relation_size('turns')"
    " + pg_total_relation_size('idempotency')"
)
TEXT = (
    "Could you check the train times from Lisbon to Porto tomorrow morning and tell me "
    "which one arrives before ten, with the price of a second-class ticket?"
)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _stats(latencies: list[float]) -> dict[str, float]:
    return {
        "n": len(latencies),
        "p50_ms": statistics.median(latencies),
        "p99_ms": _pct(latencies, 0.99),
        "max_ms": max(latencies),
    }


def _turn(n: int) -> sessions_pb2.Turn:
    if n % 2:
        return sessions_pb2.Turn(message=common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=TEXT))
    return sessions_pb2.Turn(
        message=common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content=TEXT.upper()),
        usage=common_pb2.Usage(input_tokens=900, output_tokens=40, total_tokens=940),
        cost_micros=210,
        model="gpt-4o-mini",
    )


async def _timed(call: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000


async def _append(suite: Suite, sid: str, n: int) -> None:
    await suite.sessions.AppendTurns(
        sessions_pb2.AppendTurnsRequest(
            caller=CALLER, session_id=sid, expected_version=-1, idempotency_key=f"{sid}-{n}", turns=[_turn(n)]
        )
    )


async def _context(suite: Suite, sid: str) -> None:
    await suite.sessions.GetContext(
        sessions_pb2.GetContextRequest(caller=CALLER, session_id=sid, token_budget=4000, model="gpt-4o-mini")
    )


async def _throughput(suite: Suite, concurrency: int, seconds: float, what: str) -> float:
    sids = [f"tp-{what}-{i}" for i in range(concurrency)]
    for sid in sids:
        await suite.sessions.CreateSession(sessions_pb2.CreateSessionRequest(caller=CALLER, session_id=sid))
        await _append(suite, sid, 0)
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(sid: str) -> None:
        nonlocal done
        n = 1
        while time.perf_counter() < deadline:
            if what == "append":
                await _append(suite, sid, n)
            else:
                await _context(suite, sid)
            n += 1
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(sid) for sid in sids))
    return done / (time.perf_counter() - started)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    base = os.environ.get("BALLAST_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(base)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    dsn = f"{base}{'&' if '?' in base else '?'}{urlencode({'search_path': schema})}"
    suite = await start_suite(
        ["sessions"],
        {
            "BALLAST_SESSIONS_STORE": dsn,
            "BALLAST_SESSIONS_COMPACTION": "false",
            "BALLAST_LOG_LEVEL": "warning",
        },
    )
    conn = await asyncpg.connect(dsn)
    try:
        sid = "long"
        await suite.sessions.CreateSession(sessions_pb2.CreateSessionRequest(caller=CALLER, session_id=sid))
        for n in range(20):  # warm up connections and prepared statements on a scratch session
            await suite.sessions.CreateSession(
                sessions_pb2.CreateSessionRequest(caller=CALLER, session_id=f"w{n}")
            )
            await _append(suite, f"w{n}", 0)
            await _context(suite, f"w{n}")
        window, turns = args.window, args.turns

        async def create(session_id: str) -> None:
            await suite.sessions.CreateSession(
                sessions_pb2.CreateSessionRequest(caller=CALLER, session_id=session_id)
            )

        size = int(await conn.fetchval(SIZE_SQL))
        for n in range(1, window + 1):
            await _append(suite, sid, n)
        bytes_first = (int(await conn.fetchval(SIZE_SQL)) - size) / window
        await create("full")  # a session whose 4k window is already full
        for n in range(1, window + 1):
            await _append(suite, "full", n)
        for n in range(window + 1, turns - window + 1):
            await _append(suite, sid, n)
        # Interleaved: each turn-1 call is followed by a turn-1,000 call, so whatever else the
        # shared machine is doing hits both series alike.
        append_first: list[float] = []
        append_last: list[float] = []
        for i in range(window):
            await create(f"fresh{i}")
            append_first.append(await _timed(lambda i=i: _append(suite, f"fresh{i}", 1)))  # type: ignore[misc]
            n = turns - window + 1 + i
            append_last.append(await _timed(lambda n=n: _append(suite, sid, n)))  # type: ignore[misc]
        ctx_first: list[float] = []
        ctx_full: list[float] = []
        ctx_last: list[float] = []
        for i in range(args.samples):
            ctx_first.append(await _timed(lambda i=i: _context(suite, f"fresh{i % window}")))  # type: ignore[misc]
            ctx_full.append(await _timed(lambda: _context(suite, "full")))
            ctx_last.append(await _timed(lambda: _context(suite, sid)))
        size = int(await conn.fetchval(SIZE_SQL))
        for n in range(turns + 1, turns + window + 1):
            await _append(suite, sid, n)
        bytes_last = (int(await conn.fetchval(SIZE_SQL)) - size) / window
        append_rps = await _throughput(suite, args.concurrency, args.seconds, "append")
        context_rps = await _throughput(suite, args.concurrency, args.seconds, "context")
    finally:
        await conn.close()
        await suite.stop()
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()
    return {
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}",
        "turns": args.turns,
        "window": window,
        "append_first": _stats(append_first),
        "append_last": _stats(append_last),
        "context_first": _stats(ctx_first),
        "context_full": _stats(ctx_full),
        "context_last": _stats(ctx_last),
        "bytes_per_turn_first": bytes_first,
        "bytes_per_turn_last": bytes_last,
        "append_rps": append_rps,
        "context_rps": context_rps,
        "concurrency": args.concurrency,
        # The machine is shared: the 1-minute load average says how busy it was.
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def table(result: dict[str, Any]) -> str:
    w, t = result["window"], result["turns"]
    rows = [
        ("AppendTurns", "turn 1 (a new session each call)", result["append_first"]),
        ("AppendTurns", f"turns {t - w + 1}-{t} of one session", result["append_last"]),
        ("GetContext (4k budget)", "at turn 1", result["context_first"]),
        ("GetContext (4k budget)", f"at turn {w} (window full)", result["context_full"]),
        ("GetContext (4k budget)", f"at turn {t}", result["context_last"]),
    ]
    lines = [
        f"Sessions on PostgreSQL, through gRPC ({result['machine']};"
        f" load average {result['load_average'][0]:g} before, {result['load_average'][1]:g} after)",
        "",
        "| call | when | calls | p50 ms | p99 ms | max ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, when, s in rows:
        lines.append(
            f"| {name} | {when} | {s['n']} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['max_ms']:.2f} |"
        )
    lines += [
        "",
        "| measure | value |",
        "|---|---:|",
        f"| bytes stored per turn, turns 1-{w} | {result['bytes_per_turn_first']:.0f} |",
        f"| bytes stored per turn, turns {t + 1}-{t + w} | {result['bytes_per_turn_last']:.0f} |",
        f"| AppendTurns throughput, {result['concurrency']} clients | {result['append_rps']:.0f}/s |",
        f"| GetContext throughput, {result['concurrency']} clients | {result['context_rps']:.0f}/s |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    if not 0 < args.window <= args.turns // 2:
        parser.error("--window must be between 1 and half of --turns")
    result = asyncio.run(asyncio.wait_for(run(args), timeout=300))
    text = table(result)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sessions_append.md").write_text(text + "\n")
    (RESULTS / "sessions_append.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
