"""50 writers on ONE session, on PostgreSQL through gRPC: head appends beside versioned ones.

    .venv/bin/python -m bench.sessions_contention [--writers 50] [--seconds 5] [--rounds 2]
        [--scenarios head,versioned] [--baseline REV]

Each run starts the sessions service as its own process (`python -m services.sessions`, a
fresh PostgreSQL schema from BALLAST_TEST_POSTGRES_DSN, default
postgresql://postgres@127.0.0.1:5432/test) and runs --writers clients in this process that
append one turn at a time to one session, each append with its own idempotency key, for
--seconds. Scenarios:

  head        expected_version=-1 (the recommended path when turns do not depend on the exact
              history): never conflicts.
  versioned   the documented client loop for turns that do (services/sessions/README.md):
              send the version last seen, with wait_for_next_turn (each writer appends again);
              on OK take next_turn_version; on ABORTED wait RetryInfo's retry_delay, take
              ErrorInfo's current_version and retry with the same idempotency key.
  solo        `versioned` with one writer and nobody else: each append waits for the one before
              it to be answered, as every versioned append of a contended session must, so this
              is the fastest a chain of versioned appends on one session can go here.
  aborted     `versioned` without wait_for_next_turn: every append learns its version from
              an ABORTED first (two calls per append on a contended session; the loop before
              wait_for_next_turn existed).
  noqueue     `versioned` against BALLAST_SESSIONS_CONFLICT_QUEUE_MAX=0 (conflicts answered at
              once, every loser retries after RetryInfo's jittered delay; no turns kept).
  backoff     `noqueue` with clients that ignore RetryInfo and back off exponentially with full
              jitter (1 ms doubling to 100 ms), as the issue measured.

Throughput counts the appends acknowledged within --seconds (calls still waiting when the time
is up are cancelled, their wait so far counted). "wait" is the time from an append's first
attempt to its success (with wait_for_next_turn, to its answer, which waits for the writer's
next turn). Every run checks that each acknowledged append is stored exactly once
(its key appears once among the session's turns) and that no two got the same version.

Scenarios alternate within each of --rounds rounds, and with --baseline REV the service of that
git revision (exported with `git archive`, same virtualenv) runs beside this tree's, alternating
too: the machine is shared, compare rows of one run. "vs head" divides by the head row of the
same round and tree. Results go to bench/results/sessions_contention.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
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

from bench.support import ROOT, healthy, install_baseline_requirements, suite_pythonpath
from services.kit.net import free_port

RESULTS = Path(__file__).resolve().parent / "results"
CALLER = common_pb2.Caller(tenant_id="bench", user_id="u1")
TEXT = "Which train from Lisbon arrives in Porto before ten tomorrow, and what does it cost?"
# Each call's deadline, as a client would set one (the service answers ABORTED before it).
DEADLINE = 5.0


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    expected_version: bool
    queue: bool = True
    follow_hint: bool = True
    # Ask for the next turn with each append (wait_for_next_turn).
    next_turn: bool = False
    # Writers of this scenario (None: --writers).
    writers: int | None = None


SCENARIOS = {
    s.name: s
    for s in [
        Scenario("head", "head (expected_version -1)", expected_version=False),
        Scenario("versioned", "versioned, documented loop", expected_version=True, next_turn=True),
        Scenario(
            "solo",
            "one versioned writer alone",
            expected_version=True,
            next_turn=True,
            writers=1,
        ),
        Scenario("aborted", "versioned, ABORTED loop only", expected_version=True),
        Scenario("noqueue", "versioned, no queue", expected_version=True, queue=False),
        Scenario(
            "backoff",
            "versioned, no queue, exp. backoff",
            expected_version=True,
            queue=False,
            follow_hint=False,
        ),
    ]
}


@dataclass
class Tally:
    waits: list[float] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    acked: dict[str, int] = field(default_factory=dict)  # idempotency key -> version
    aborted: int = 0
    errors: int = 0
    pending: dict[int, float] = field(default_factory=dict)  # writer -> first attempt


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def _service(tree: Path, dsn: str, queue: bool) -> AsyncIterator[tuple[str, int]]:
    port = free_port()
    env = {
        **os.environ,
        "BALLAST_SESSIONS_PORT": str(port),
        "BALLAST_SESSIONS_STORE": dsn,
        "BALLAST_SESSIONS_COMPACTION": "false",
        "BALLAST_METRICS": "false",
        "BALLAST_LOG_LEVEL": "warning",
        "OTEL_SDK_DISABLED": "true",
        "BALLAST_SESSIONS_CONFLICT_QUEUE_MAX": "1000" if queue else "0",
        # The tree's own code and generated protos (not this checkout's, which the editable
        # install would find), and what an older tree needs that this environment lacks.
        "PYTHONPATH": os.pathsep.join(suite_pythonpath(tree)),
    }
    process = await asyncio.to_thread(
        subprocess.Popen, [sys.executable, "-m", "services.sessions"], cwd=tree, env=env
    )
    address = f"127.0.0.1:{port}"
    try:
        await healthy(address, within=60)
        yield address, process.pid
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 30)


def retry_hint(exc: grpc.aio.AioRpcError) -> tuple[int | None, float]:
    """ErrorInfo's current_version and RetryInfo's retry_delay of an ABORTED answer."""
    status = rpc_status.from_call(exc)
    current, delay = None, 0.0
    for detail in status.details if status is not None else []:
        info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
            if "current_version" in info.metadata:
                current = int(info.metadata["current_version"])
        elif detail.Is(retry.DESCRIPTOR):
            detail.Unpack(retry)
            delay = retry.retry_delay.ToNanoseconds() / 1e9
    return current, delay


async def _writer(
    stub: Any, session: str, who: int, scenario: Scenario, stop_at: float, tally: Tally
) -> None:
    rng = random.Random(who)
    version = 0  # the version this writer last saw (the session starts at 0)
    n = 0
    while time.monotonic() < stop_at:
        n += 1
        key = f"w{who}-{n}"
        request = sessions_pb2.AppendTurnsRequest(
            caller=CALLER,
            session_id=session,
            idempotency_key=key,
            turns=[
                sessions_pb2.Turn(
                    message=common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=f"{TEXT} [{key}]")
                )
            ],
        )
        started = time.monotonic()
        tally.pending[who] = started
        attempts, backoff = 0, 0.001
        while True:
            attempts += 1
            request.expected_version = version if scenario.expected_version else -1
            request.wait_for_next_turn = scenario.next_turn
            try:
                reply = await stub.AppendTurns(request, timeout=DEADLINE)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.ABORTED:
                    tally.errors += 1  # UNAVAILABLE, DEADLINE_EXCEEDED: retry the same key
                    await asyncio.sleep(0.05)
                    continue
                tally.aborted += 1
                current, delay = retry_hint(exc)
                if current is not None:
                    version = current
                if scenario.follow_hint:
                    if delay > 0:  # zero: the service keeps this writer's place, retry at once
                        await asyncio.sleep(delay)
                else:
                    await asyncio.sleep(rng.random() * backoff)
                    backoff = min(backoff * 2, 0.1)
                continue
            done = time.monotonic()
            # The turn kept for this writer's next append, else the version it just made.
            version = reply.next_turn_version or reply.session.version
            del tally.pending[who]
            if done <= stop_at:
                tally.waits.append(done - started)
                tally.attempts.append(attempts)
            tally.acked[key] = reply.session.version
            break


async def _stored_keys(stub: Any, session: str) -> list[str]:
    keys, token = [], ""
    while True:
        page = await stub.ListTurns(
            sessions_pb2.ListTurnsRequest(caller=CALLER, session_id=session, page_size=500, page_token=token)
        )
        keys += [t.message.content.rsplit("[", 1)[1].rstrip("]") for t in page.turns]
        token = page.next_page_token
        if not token:
            return keys


async def _warm(stub: Any) -> None:
    """Connections and prepared statements, on another session."""
    await stub.CreateSession(sessions_pb2.CreateSessionRequest(caller=CALLER, session_id="warm"))
    turn = sessions_pb2.Turn(message=common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="w"))
    for _ in range(50):
        await stub.AppendTurns(
            sessions_pb2.AppendTurnsRequest(
                caller=CALLER, session_id="warm", expected_version=-1, turns=[turn]
            )
        )


@dataclass
class Service:
    stub: Any
    pid: int


@contextlib.asynccontextmanager
async def _started(base: str, tree: Path, queue: bool) -> AsyncIterator[Service]:
    """A sessions service of `tree` on a schema of its own, warmed up."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(base)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    dsn = f"{base}{'&' if '?' in base else '?'}{urlencode({'search_path': schema})}"
    try:
        async with (
            _service(tree, dsn, queue) as (address, pid),
            grpc.aio.insecure_channel(address) as channel,
        ):
            stub = sessions_pb2_grpc.SessionsServiceStub(channel)
            await _warm(stub)
            yield Service(stub, pid)
    finally:
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()


async def _scenario(
    service: Service, session: str, scenario: Scenario, writers: int, seconds: float
) -> dict[str, Any]:
    """--writers writers on a new session of `service` for `seconds`."""
    stub = service.stub
    await stub.CreateSession(sessions_pb2.CreateSessionRequest(caller=CALLER, session_id=session))
    tally = Tally()
    cpu_before = _cpu_seconds(service.pid)
    stop_at = time.monotonic() + seconds
    tasks = [asyncio.create_task(_writer(stub, session, i, scenario, stop_at, tally)) for i in range(writers)]
    await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
    unfinished = [stop_at - t for t in tally.pending.values()]
    server_cpu = _cpu_seconds(service.pid) - cpu_before
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.5)  # calls cancelled mid-append may still commit: let them
    stored = await _stored_keys(stub, session)
    stored_keys = set(stored)
    missing = [k for k in tally.acked if k not in stored_keys]
    assert not missing, f"acknowledged appends missing: {missing[:5]}"
    assert len(stored) == len(set(stored)), "an append was stored twice"
    assert len(set(tally.acked.values())) == len(tally.acked), "two appends acknowledged at one version"
    waits = tally.waits
    done = len(waits)
    ordered = sorted(waits) or [0.0]
    return {
        "scenario": scenario.name,
        "label": scenario.label,
        "appends": done,
        "throughput": done / seconds,
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


def _export(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True)
    into.mkdir(parents=True, exist_ok=True)
    tar_path = into / "tree.tar"
    tar_path.write_bytes(archive.stdout)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def _trees(baselines: str, folder: Path) -> list[tuple[str, Path]]:
    """The baselines (git revisions, or directories holding another copy of the code), then
    this tree."""
    trees = []
    for n, baseline in enumerate(b for b in baselines.split(",") if b):
        if Path(baseline).is_dir():
            tree = Path(baseline)
        else:
            tree = _export(baseline, folder / str(n))
            install_baseline_requirements(tree)
        trees.append((f"baseline {baseline}", tree))
    return [*trees, ("this tree", ROOT)]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = os.environ.get("BALLAST_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    load_before = os.getloadavg()[0]
    rows = []
    scenarios = [SCENARIOS[name] for name in args.scenarios]
    with tempfile.TemporaryDirectory() as folder:
        trees = _trees(args.baseline, Path(folder))
        async with contextlib.AsyncExitStack() as stack:
            # One service per tree and queue setting, started once: the rounds alternate among
            # them every few seconds, so a change in the machine's load hits all alike.
            services = {
                (tree_name, queue): await stack.enter_async_context(_started(base, tree, queue))
                for tree_name, tree in trees
                for queue in sorted({s.queue for s in scenarios})
            }
            for round_ in range(1, args.rounds + 1):
                for tree_name, _ in trees:
                    for scenario in scenarios:
                        service = services[(tree_name, scenario.queue)]
                        session = f"r{round_}-{scenario.name}"
                        writers = scenario.writers or args.writers
                        row = await _scenario(service, session, scenario, writers, args.seconds)
                        rows.append({"round": round_, "tree": tree_name, **row})
                        print(
                            f"  round {round_}, {tree_name}, {row['label']}: {row['throughput']:.0f}/s,"
                            f" worst wait {row['wait_max_ms']:.0f} ms",
                            file=sys.stderr,
                        )
    return {
        "writers": args.writers,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "baseline": args.baseline,
        "scenarios": args.scenarios,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    heads = {(r["round"], r["tree"]): r["throughput"] for r in result["rows"] if r["scenario"] == "head"}
    lines = [
        f"{result['writers']} writers on one session, {result['seconds']:g} s a run, sessions service"
        f" on PostgreSQL through gRPC ({result['machine']}; load average"
        f" {result['load_average'][0]:g} before, {result['load_average'][1]:g} after)",
        "",
        "| round | service | writers | appends/s | vs head | wait p50 ms | wait p99 ms | worst wait ms"
        " | attempts/append | max attempts | unfinished | server CPU ms/append |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        head = heads.get((row["round"], row["tree"]))
        ratio = f"{row['throughput'] / head:.2f}x" if head else "-"
        lines.append(
            f"| {row['round']} | {row['tree']} | {row['label']} | {row['throughput']:.0f} | {ratio}"
            f" | {row['wait_p50_ms']:.1f} | {row['wait_p99_ms']:.1f} | {row['wait_max_ms']:.0f}"
            f" | {row['attempts_per_append']:.2f} | {row['max_attempts']} | {row['unfinished']}"
            f" | {row['server_cpu_ms_per_append']:.2f} |"
        )
    command = (
        f".venv/bin/python -m bench.sessions_contention --writers {result['writers']}"
        f" --seconds {result['seconds']:g} --rounds {result['rounds']}"
        f" --scenarios {','.join(result['scenarios'])}"
        + (f" --baseline {result['baseline']}" if result["baseline"] else "")
    )
    lines += ["", "Summary (medians over the rounds; ratio = the median of each round's ratio):", ""]
    lines += [
        "| service | writers | appends/s | vs head | worst wait ms (any round) |",
        "|---|---|---:|---:|---:|",
    ]
    for tree in dict.fromkeys(r["tree"] for r in result["rows"]):
        for name in result["scenarios"]:
            mine = [r for r in result["rows"] if r["tree"] == tree and r["scenario"] == name]
            ratios = [
                r["throughput"] / heads[(r["round"], tree)] for r in mine if heads.get((r["round"], tree))
            ]
            lines.append(
                f"| {tree} | {mine[0]['label']} | {statistics.median(r['throughput'] for r in mine):.0f}"
                f" | {f'{statistics.median(ratios):.2f}x' if ratios else '-'}"
                f" | {max(r['wait_max_ms'] for r in mine):.0f} |"
            )
    lines += [
        "",
        f"Command: `{command}`.",
        "appends/s = appends acknowledged within the run; wait = first attempt to success of one"
        " append (appends unfinished when the time was up count with their wait so far);"
        " attempts/append includes that success.",
        "A versioned writer on a contended session must learn the new version before it may"
        " append, so versioned appends of one session follow one another, each costing one client"
        " round trip plus one PostgreSQL round trip; head appends from many writers overlap.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--writers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scenarios", default="head,versioned", help=f"of {','.join(SCENARIOS)}")
    parser.add_argument(
        "--baseline", default="", help="git revisions or code directories to run beside this tree (a,b)"
    )
    args = parser.parse_args()
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"--scenarios: unknown {unknown}, known: {', '.join(SCENARIOS)}")
    if args.writers < 1 or args.seconds <= 0 or args.rounds < 1:
        parser.error("--writers and --rounds must be 1 or more and --seconds more than 0")
    result = asyncio.run(run(args))
    text = table(result)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sessions_contention.md").write_text(text + "\n")
    (RESULTS / "sessions_contention.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
