"""CPU seconds the suite spends per completed chat, path by path (issue 23's measurement).

    .venv/bin/python -m bench.chat_cpu [--chats 160] [--rounds 2] [--layouts one,split]
        [--telemetry off,export] [--paths noop,miss,hit,d1,d10,d100,d1000] [--baseline REV]

Starts a SIMULATED OpenAI-compatible provider (`python -m services.router.sim`, zero latency,
instant tokens) and the suite in child processes on free 127.0.0.1 ports, memory stores, the demo
keys file, a router catalog that points every alias at the sim. This process is the client: it
sends `EdgeService/Chat` (enterprise demo key, so no tier limit interferes) at --concurrency 8
and reads the suite's CPU time (utime + stime of every process of its tree, from /proc) before and
after a fixed number of completed chats. The sim's CPU is not counted; neither is the client's.
Each call's latency as the client saw it is kept too (p50, p99 and the slowest call of all
rounds): a pause of the suite, such as a full garbage collection, shows there.

Layouts: `one` is `ballast up` (all five services in one process); `split` is each service in its
own process (`python -m services.<name>`), CPU summed over the five.
Telemetry: `off` is the default set-up (no OTEL_* variable: no exporter is configured); `export`
sends traces and metrics over OTLP/gRPC to a collector this benchmark runs in another child
process (it decodes and counts every span it receives, so the table shows spans per chat);
`sampled` is `export` keeping one trace in ten (OTEL_TRACES_SAMPLER=parentbased_traceidratio,
OTEL_TRACES_SAMPLER_ARG=0.1); `disabled` sets OTEL_SDK_DISABLED=true. A setting may add OTEL_*
variables after a `+` each, to take telemetry's cost apart: `export+OTEL_METRICS_EXPORTER=none`
is `export` without metrics over OTLP; BALLAST_* variables too, to set a service knob beside the
default in one run (`off+BALLAST_GC_FREEZE=false`).
Paths: `noop` is grpc.health.v1 Check on the edge; `router` is RouterService/Complete called
directly (one non-streamed provider call through the router, nothing else); `stream10` and
`stream100` are RouterService/StreamComplete relaying 10 or 100 content chunks (a second sim,
`--answer-pieces`, cut to that many by max_output_tokens: real OpenAI SSE, one token a chunk);
`router-stream` runs both and adds their difference per chunk, the relay's CPU per chunk (with
`--stream-pace-ms` the sim spaces a stream's chunks, so each arrives, and is relayed, on its own);
`miss` a stateless chat with a new question each
time (limiter, cache lookup with the local embedder, router, cache store, commit); `hit` the same
stateless question again (an exact cache hit); `dN` a chat in a session that already holds N
earlier exchanges (a user turn and an answer each, about 70 tokens an exchange), prefilled through
sessions.AppendTurns before the clock starts. Sessions stay within 10% of their depth while
measured: each gets at most max(1, N/10) of the measured chats (at least 16 sessions), one at a time. With the default 4,000-token
context and 3,000-token compaction threshold, sessions from about d50 up are compacted (by the
sim, through the router), and that CPU is counted when it happens inside the measured window.

`--telemetry-side-by-side` runs this tree once per --telemetry setting instead, the settings
alternating round by round like trees (one column each; no --baseline): telemetry's own cost,
free of the drift between settings measured one after another.

`--baseline REV` checks REV out into a temporary git worktree and runs its suite beside this
tree's, with the same settings, measuring old and new alternately (each round swaps the order)
so drifting load on the machine hits both alike. A package REV needs and this environment lacks
(opentelemetry-instrumentation-grpc, before issue 23's work) is installed with pip for REV's
suite alone (bench/support.py). Results go to bench/results/chat_cpu.{md,json}.
`--py-spy DIR` records this tree's suite with py-spy (if installed) during each measured batch,
Python frames only and without pausing the process (`--nonblocking`), so the suite runs at about
its normal speed; `--py-spy-native` adds native frames (gRPC core, onnxruntime), which pauses the
process at every sample and slows the chats several times over (the proportions still hold).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2, edge_pb2_grpc
from ballast.router.v1 import router_pb2, router_pb2_grpc
from ballast.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.support import (
    baseline_tree,
    collector_variables,
    cpu_description,
    instant_sim,
    remove_baseline_tree,
    suite_pythonpath,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SERVICES = ("limiter", "router", "cache", "sessions", "edge")  # start order: dependencies first
# Telemetry set-ups that send spans to the benchmark's collector.
EXPORTING = frozenset({"export", "sampled"})


def _telemetry_base(setting: str) -> str:
    """`export` of `export+OTEL_METRICS_EXPORTER=none`."""
    return setting.split("+", 1)[0]


def _telemetry_variables(setting: str) -> dict[str, str]:
    """The OTEL_* and BALLAST_* variables a setting adds after its base, each after a `+`."""
    pairs = [part.partition("=") for part in setting.split("+")[1:]]
    return {name: value for name, _, value in pairs}


API_KEY = "bk_demo_enterprise"  # tenant demo, user carol: no request or daily token limit
CALLER = common_pb2.Caller(tenant_id="demo", user_id="carol", tier="enterprise")
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
PATHS = ("noop", "router", "stream10", "stream100", "miss", "hit", "d1", "d10", "d100", "d1000")
# `router-stream` on the command line: both stream lengths, and the relay's CPU per chunk from them.
STREAM_PATHS = {"router-stream": ("stream10", "stream100")}
STREAM_CHUNKS = {"stream10": 10, "stream100": 100}
# Pieces of every answer of the streaming sim: more than the longest stream asks for (max_tokens).
STREAM_SIM_PIECES = 100

CATALOG = """
providers:
  sim-bench:
    kind: sim          # an external SIMULATED provider (started by the benchmark)
    wire: openai
    base_url: http://127.0.0.1:{port}/v1
  sim-stream:
    kind: sim          # the same, answering with STREAM_SIM_PIECES pieces (cut by max_tokens)
    wire: openai
    base_url: http://127.0.0.1:{stream_port}/v1
models:
  sim-bench-model:
    provider: sim-bench
    provider_model: sim-bench-1
    context_window: 1000000
    input_price_micros_per_mtok: 150000
    output_price_micros_per_mtok: 600000
  sim-stream-model:
    provider: sim-stream
    provider_model: sim-stream-1
    context_window: 1000000
    input_price_micros_per_mtok: 150000
    output_price_micros_per_mtok: 600000
aliases:
  budget: {{candidates: [sim-bench-model]}}
  fast: {{candidates: [sim-bench-model]}}
  reasoning: {{candidates: [sim-bench-model]}}
  stream-bench: {{candidates: [sim-stream-model]}}
tier_defaults: {{default: budget}}
"""

USER_TURN = (
    "Question {i} ({tag}): how should a gateway route a chat when the cheapest provider is slow today?"
)
ANSWER_TURN = (
    "Answer {i}: send it to the next provider in the fallback chain whose recent latency is within "
    "budget, keep the slow one in rotation with a smaller weight, and retry once on a timeout."
)


# --- the suite's processes and their CPU ------------------------------------------------------------


_HANDED_OUT: set[int] = set()


def _free_port() -> int:
    """A port free now and not handed out before by this run (two suites start side by side;
    the kernel may offer a just-closed port again before its first taker binds it)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"a suite process exited ({process.returncode}) before 127.0.0.1:{port} listened"
            )
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(parent, []).append(int(entry))
    return tree


def tree_cpu_seconds(roots: list[int]) -> float:
    """utime + stime of `roots` and every descendant (and of descendants they have reaped)."""
    tree = _children()
    ticks = 0
    stack = list(roots)
    while stack:
        pid = stack.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # Fields 14-17 of stat (utime, stime, cutime, cstime) are 11-14 after the command name.
        ticks += sum(int(value) for value in fields[11:15])
        stack.extend(tree.get(pid, []))
    return ticks / CLOCK_TICK


@dataclass
class Suite:
    """One tree's suite (this one or the baseline's), in the chosen layout and telemetry."""

    label: str
    root: Path
    layout: str
    telemetry: str
    sim_port: int
    stream_sim_port: int
    sink_port: int
    folder: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "BALLAST_"))}
        catalog = self.folder / f"catalog-{self.label}.yaml"
        catalog.write_text(CATALOG.format(port=self.sim_port, stream_port=self.stream_sim_port))
        env.update(
            {
                "PYTHONPATH": os.pathsep.join(suite_pythonpath(self.root)),
                "BALLAST_LOG_LEVEL": "warning",
                "BALLAST_EDGE_KEYS_FILE": str(self.root / "config" / "edge_keys.yaml"),
                "BALLAST_ROUTER_CATALOG_FILE": str(catalog),
            }
        )
        for name in SERVICES:
            self.ports[name] = _free_port()
            env[f"BALLAST_{name.upper()}_PORT"] = str(self.ports[name])
            env[f"BALLAST_{name.upper()}_ADDR"] = f"127.0.0.1:{self.ports[name]}"
            # Metrics stay on, as by default (each service's Prometheus endpoint on a free port).
            env[f"BALLAST_{name.upper()}_METRICS_PORT"] = str(_free_port())
        # The edge's OpenAI-compatible HTTP face stays on, on a free port (two suites run side by side).
        env["BALLAST_EDGE_HTTP_PORT"] = str(_free_port())
        base = _telemetry_base(self.telemetry)
        if base in EXPORTING:
            # `sampled`: what a busy deployment would run, one trace in ten kept.
            env.update(collector_variables(self.sink_port, "0.1" if base == "sampled" else None))
        elif base == "disabled":
            env["OTEL_SDK_DISABLED"] = "true"
        env.update(_telemetry_variables(self.telemetry))
        return env

    def start(self) -> None:
        env = self.env()
        python = sys.executable
        if self.layout == "one":
            commands = [[python, "-m", "services.cli", "up"]]
        else:
            commands = [[python, "-m", f"services.{name}"] for name in SERVICES]
        for command, name in zip(commands, SERVICES if self.layout == "split" else ["edge"], strict=True):
            with (self.folder / f"{self.label}-{self.layout}-{self.telemetry}.log").open("ab") as log:
                process = subprocess.Popen(command, cwd=self.root, env=env, stdout=log, stderr=log)
            self.processes.append(process)
            if self.layout == "split":
                _wait_port(self.ports[name], process)
        try:
            for name in SERVICES:
                _wait_port(self.ports[name], self.processes[-1])
        except RuntimeError as exc:
            log_file = self.folder / f"{self.label}-{self.layout}-{self.telemetry}.log"
            tail = log_file.read_text(errors="replace")[-3000:] if log_file.exists() else "(no log)"
            raise RuntimeError(f"{self.label} suite: {exc}; its log ends with:\n{tail}") from None

    def start_retrying(self, attempts: int = 3) -> None:
        """start(), on fresh ports again when one was taken before the suite bound it (other
        processes on a shared machine draw their ephemeral ports from the same range)."""
        for attempt in range(attempts):
            try:
                self.start()
                return
            except RuntimeError as exc:
                self.stop()
                self.processes.clear()
                if attempt == attempts - 1 or "bind" not in str(exc).lower():
                    raise
                print(f"    {self.label}: a port was taken; starting again", file=sys.stderr, flush=True)

    def cpu(self) -> float:
        return tree_cpu_seconds([p.pid for p in self.processes])

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --- an OTLP collector that counts what it is sent ---------------------------------------------------


def run_sink(port: int, count_file: Path) -> None:
    """A local OTLP/gRPC collector (traces and metrics): counts spans, writes the count to a file."""
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    spans = 0

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        async def Export(  # noqa: N802
            self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
        ) -> trace_service_pb2.ExportTraceServiceResponse:
            nonlocal spans
            spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            count_file.write_text(str(spans))  # noqa: ASYNC240 # a few bytes, read by the benchmark
            return trace_service_pb2.ExportTraceServiceResponse()

    class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
        async def Export(  # noqa: N802
            self, request: metrics_service_pb2.ExportMetricsServiceRequest, context: Any
        ) -> metrics_service_pb2.ExportMetricsServiceResponse:
            return metrics_service_pb2.ExportMetricsServiceResponse()

    async def serve() -> None:
        server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)  # type: ignore[no-untyped-call]
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)  # type: ignore[no-untyped-call]
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        stopped = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
        await stopped.wait()
        await server.stop(None)

    asyncio.run(serve())


def _spans(count_file: Path) -> int:
    try:
        return int(count_file.read_text() or 0)
    except (OSError, ValueError):
        return 0


# --- the client ---------------------------------------------------------------------------------------


@dataclass
class Client:
    suite: Suite
    channel: grpc.aio.Channel
    # The generated stubs are typed for the sync API; under grpc.aio every call is awaitable.
    edge: Any
    sessions: Any
    health: Any
    router: Any

    @classmethod
    def of(cls, suite: Suite) -> Client:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{suite.ports['edge']}")
        internal = grpc.aio.insecure_channel(f"127.0.0.1:{suite.ports['sessions']}")
        router = grpc.aio.insecure_channel(f"127.0.0.1:{suite.ports['router']}")
        return cls(
            suite,
            channel,
            edge_pb2_grpc.EdgeServiceStub(channel),
            sessions_pb2_grpc.SessionsServiceStub(internal),
            health_pb2_grpc.HealthStub(channel),
            router_pb2_grpc.RouterServiceStub(router),
        )


METADATA = (("authorization", f"Bearer {API_KEY}"),)


def _chat(content: str, session_id: str = "", *, exact_only: bool = False) -> edge_pb2.ChatRequest:
    return edge_pb2.ChatRequest(
        session_id=session_id,
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=content)],
        cache_mode=edge_pb2.CACHE_MODE_EXACT_ONLY if exact_only else edge_pb2.CACHE_MODE_UNSPECIFIED,
    )


async def _prefilled_sessions(client: Client, count: int, depth: int) -> list[str]:
    """`count` sessions each holding `depth` earlier exchanges, made through the real RPCs."""
    ids: list[str] = []
    for _ in range(count):
        made = await client.edge.CreateSession(edge_pb2.CreateSessionRequest(), metadata=METADATA, timeout=30)
        ids.append(made.session.session_id)
    tag = uuid.uuid4().hex[:8]

    async def fill(session_id: str) -> None:
        turns = []
        for i in range(depth):
            turns.append(
                sessions_pb2.Turn(
                    message=common_pb2.ChatMessage(
                        role=common_pb2.ROLE_USER, content=USER_TURN.format(i=i, tag=tag)
                    )
                )
            )
            turns.append(
                sessions_pb2.Turn(
                    message=common_pb2.ChatMessage(
                        role=common_pb2.ROLE_ASSISTANT, content=ANSWER_TURN.format(i=i)
                    ),
                    model="sim-bench-model",
                )
            )
        for start in range(0, len(turns), 100):  # the service's default BALLAST_SESSIONS_MAX_TURNS_PER_APPEND
            await client.sessions.AppendTurns(
                sessions_pb2.AppendTurnsRequest(
                    caller=CALLER,
                    session_id=session_id,
                    expected_version=-1,
                    turns=turns[start : start + 100],
                ),
                timeout=60,
            )

    for index in range(0, len(ids), 8):
        await asyncio.gather(*(fill(s) for s in ids[index : index + 8]))
    return ids


async def _idle(suite: Suite, limit: float = 90.0) -> None:
    """Waits until the suite's background work (compaction after a prefill) has settled."""
    deadline = time.monotonic() + limit
    quiet = 0
    while time.monotonic() < deadline and quiet < 2:
        before = suite.cpu()
        await asyncio.sleep(0.5)
        quiet = quiet + 1 if suite.cpu() - before < 0.05 else 0


@dataclass
class Batch:
    calls: int
    cpu_s: float
    wall_s: float
    failures: int
    spans: int = 0
    # Seconds each successful call took, as the client saw it (queueing at --concurrency included).
    latencies: list[float] = field(default_factory=list)


async def _run_batch(
    suite: Suite, call: Callable[[int], Awaitable[Any]], calls: int, concurrency: int
) -> Batch:
    failures = 0
    indices = iter(range(calls))
    latencies: list[float] = []

    async def worker() -> None:
        nonlocal failures
        for index in indices:
            try:
                sent = time.perf_counter()
                await call(index)
                latencies.append(time.perf_counter() - sent)
            except grpc.aio.AioRpcError as exc:
                failures += 1
                if failures <= 3:
                    print(
                        f"    {suite.label}: {exc.code().name}: {exc.details()}", file=sys.stderr, flush=True
                    )

    cpu_before = suite.cpu()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    # Work a call left behind (a span export, a store write) belongs to it: let it land.
    await asyncio.sleep(0.2)
    return Batch(calls, suite.cpu() - cpu_before, wall, failures, latencies=latencies)


class PathRunner:
    """Builds the calls of one path for one suite: set-up outside the clock, then the batch."""

    def __init__(self, client: Client, path: str, calls: int, *, session_exact_only: bool = False) -> None:
        self.client, self.path, self.calls = client, path, calls
        self.session_exact_only = session_exact_only
        self.sessions: list[str] = []
        self.per_session = 1

    async def prepare(self) -> None:
        client, path = self.client, self.path
        if path == "hit":
            await client.edge.Chat(_chat(self._hit_question()), metadata=METADATA, timeout=30)
        elif path.startswith("d"):
            depth = int(path[1:])
            self.per_session = max(1, depth // 10)
            count = max(16, -(-self.calls // self.per_session))
            self.sessions = await _prefilled_sessions(client, count, depth)
            await _idle(client.suite)

    def _hit_question(self) -> str:
        return "What does a gateway in front of LLM providers do, in one sentence?"

    def call(self) -> Callable[[int], Awaitable[Any]]:
        client, tag = self.client, uuid.uuid4().hex[:8]
        if self.path == "noop":
            check = health_pb2.HealthCheckRequest()
            return lambda _: client.health.Check(check, timeout=30)
        if self.path == "router":
            complete = router_pb2.CompleteRequest(
                model="budget",
                messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=self._hit_question())],
                caller=CALLER,
            )
            return lambda _: client.router.Complete(complete, timeout=30)
        if self.path in STREAM_CHUNKS:
            chunks = STREAM_CHUNKS[self.path]
            streamed = router_pb2.StreamCompleteRequest(
                request=router_pb2.CompleteRequest(
                    model="stream-bench",
                    messages=[
                        common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=self._hit_question())
                    ],
                    caller=CALLER,
                    params=common_pb2.GenerationParams(max_output_tokens=chunks),
                )
            )

            async def stream(_: int) -> None:
                # Chunks that reach the router together may be relayed as one delta: what is
                # checked is that all of them were streamed (one output token each).
                tokens = 0
                async for event in client.router.StreamComplete(streamed, timeout=30):
                    if event.HasField("done"):
                        tokens = event.done.usage.output_tokens
                assert tokens == chunks, f"{tokens} tokens streamed, {chunks} expected"

            return stream
        if self.path == "miss":
            return lambda i: client.edge.Chat(
                _chat(USER_TURN.format(i=i, tag=tag)), metadata=METADATA, timeout=30
            )
        if self.path == "hit":
            hit = _chat(self._hit_question())

            async def cached(_: int) -> None:
                reply = await client.edge.Chat(hit, metadata=METADATA, timeout=30)
                assert reply.cache_hit, "the hit path missed the cache"

            return cached
        sessions, count = self.sessions, len(self.sessions)
        # One chat at a time per session, as a person or an agent talks: concurrent chats on one
        # session would race for its version (ABORTED), which is not what this measures.
        locks = [asyncio.Lock() for _ in sessions]

        async def in_session(i: int) -> None:
            async with locks[i % count]:
                request = _chat(
                    USER_TURN.format(i=i, tag=tag), sessions[i % count], exact_only=self.session_exact_only
                )
                await client.edge.Chat(request, metadata=METADATA, timeout=60)

        return in_session


# --- the run ------------------------------------------------------------------------------------------


async def _warm(client: Client) -> None:
    tag = uuid.uuid4().hex[:8]
    for i in range(20):
        await client.edge.Chat(_chat(f"warm-up {tag} {i}: hello"), metadata=METADATA, timeout=60)
        await client.health.Check(health_pb2.HealthCheckRequest(), timeout=30)


@contextlib.contextmanager
def _py_spy(
    folder: Path | None, suite: Suite, name: str, native: bool = False, rate: int = 100
) -> Iterator[None]:
    beside = Path(sys.executable).parent / "py-spy"
    spy_bin = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
    if folder is None or suite.layout != "one" or spy_bin is None:
        yield
        return
    out = folder / f"{name}.txt"
    spy = subprocess.Popen(
        [
            spy_bin,
            "record",
            "--pid",
            str(suite.processes[0].pid),
            "--native" if native else "--nonblocking",
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(folder / f"{name}.log").open("wb"),
    )
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)


async def _measure_config(
    args: argparse.Namespace, suites: list[Suite], sink_file: Path
) -> list[dict[str, Any]]:
    clients = [Client.of(s) for s in suites]
    rows = []
    try:
        for client in clients:
            await _warm(client)
        await asyncio.sleep(1.5)  # the warm-up's spans are exported before any batch counts its own
        for path in args.paths:
            calls = (
                args.noop_calls
                if path in ("noop", "router")
                else args.stream_calls
                if path in STREAM_CHUNKS
                else args.chats
            )
            batches: dict[str, list[Batch]] = {s.label: [] for s in suites}
            for round_ in range(args.rounds):
                order = clients if round_ % 2 == 0 else list(reversed(clients))
                for client in order:
                    runner = PathRunner(client, path, calls, session_exact_only=args.session_exact_only)
                    await runner.prepare()
                    spans_before = _spans(sink_file)
                    name = f"{client.suite.layout}-{client.suite.telemetry}-{path}-r{round_}"
                    spy_into = args.py_spy if client.suite.label == "now" else None
                    with _py_spy(
                        spy_into, client.suite, name, native=args.py_spy_native, rate=args.py_spy_rate
                    ):
                        batch = await _run_batch(client.suite, runner.call(), calls, args.concurrency)
                    if _telemetry_base(client.suite.telemetry) in EXPORTING:
                        await asyncio.sleep(1.5)  # the batch span processor exports every 0.5 s here
                        batch.spans = _spans(sink_file) - spans_before
                    batches[client.suite.label].append(batch)
                    print(
                        f"  {client.suite.layout:<5} {client.suite.telemetry:<8} {path:<6} {client.suite.label:<4} "
                        f"r{round_}: {1000 * batch.cpu_s / max(1, batch.calls - batch.failures):7.2f} ms CPU/call, "
                        f"{batch.calls / batch.wall_s:7.0f}/s, {batch.failures} failed",
                        file=sys.stderr,
                        flush=True,
                    )
            modes = list(dict.fromkeys(s.telemetry for s in suites))
            row: dict[str, Any] = {"layout": suites[0].layout, "telemetry": "/".join(modes), "path": path}
            for label, runs in batches.items():
                done = sum(b.calls - b.failures for b in runs)
                row[label] = {
                    "cpu_ms_per_call": 1000 * sum(b.cpu_s for b in runs) / max(1, done),
                    "rounds_ms": [1000 * b.cpu_s / max(1, b.calls - b.failures) for b in runs],
                    "calls_per_s": sum(b.calls for b in runs) / sum(b.wall_s for b in runs),
                    "failures": sum(b.failures for b in runs),
                    "spans_per_call": sum(b.spans for b in runs) / max(1, done),
                    "latency_ms": _latency_ms([t for b in runs for t in b.latencies]),
                }
            rows.append(row)
        per_chunk = _per_chunk_row(rows, [s.label for s in suites])
        if per_chunk is not None:
            rows.append(per_chunk)
    finally:
        for client in clients:
            await client.channel.close()
    return rows


def _latency_ms(latencies: list[float]) -> dict[str, float]:
    """p50, p99 and the slowest call in milliseconds: a pause of the suite's event loop (a full
    garbage collection, say) shows in the tail, not in the CPU per call."""
    ordered = sorted(latencies) or [0.0]

    def at(quantile: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]

    return {"p50": at(0.5), "p99": at(0.99), "max": 1000 * ordered[-1]}


def _per_chunk_row(rows: list[dict[str, Any]], labels: list[str]) -> dict[str, Any] | None:
    """The stream relay's CPU per chunk: (CPU of a long stream - CPU of a short one) / the chunks
    between them. What a stream costs once (the call, the plan, the provider request, the answer)
    is in both and cancels; each round pairs the two batches measured back to back."""
    found = {row["path"]: row for row in rows}
    short, long_ = found.get("stream10"), found.get("stream100")
    if short is None or long_ is None:
        return None
    extra = STREAM_CHUNKS["stream100"] - STREAM_CHUNKS["stream10"]
    row: dict[str, Any] = {"layout": short["layout"], "telemetry": short["telemetry"], "path": "per-chunk"}
    for label in labels:
        a, b = short[label], long_[label]
        row[label] = {
            "cpu_ms_per_call": (b["cpu_ms_per_call"] - a["cpu_ms_per_call"]) / extra,
            "rounds_ms": [(y - x) / extra for x, y in zip(a["rounds_ms"], b["rounds_ms"], strict=True)],
            "calls_per_s": None,  # a difference of two batches has no rate of its own
            "failures": a["failures"] + b["failures"],
            "spans_per_call": b["spans_per_call"] - a["spans_per_call"],
            "latency_ms": None,
        }
    return row


PATH_NAMES = {
    "noop": "no-op gRPC call (health Check)",
    "router": "router alone (RouterService/Complete)",
    "miss": "stateless, cache miss",
    "hit": "stateless, exact cache hit",
    "stream10": "router stream, 10 chunks (RouterService/StreamComplete)",
    "stream100": "router stream, 100 chunks (RouterService/StreamComplete)",
    "per-chunk": "router stream relay, per chunk ((100 - 10 chunks) / 90)",
}


def _path_name(path: str) -> str:
    return PATH_NAMES.get(path, f"session, depth {path[1:]}")


def _latency_cell(latency: dict[str, float] | None) -> str:
    if not latency:
        return "-"
    return f"{latency['p50']:.1f} / {latency['p99']:.1f} / {latency['max']:.1f}"


# Student's t at 97.5% for 1-30 degrees of freedom (a 95% two-sided interval).
_T975 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13,
         2.12, 2.11, 2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04)  # fmt: skip


def paired_interval(old: list[float], new: list[float]) -> tuple[float, float] | None:
    """A 95% interval for the change from `old` to `new` CPU per call, from the rounds paired
    as they ran (a round of each tree or setting back to back, so the machine's drift between
    rounds cancels): the t interval of the rounds' log ratios, as a fraction (+0.10 = 10% more).
    None with fewer than two rounds."""
    ratios = [math.log(b / a) for a, b in zip(old, new, strict=True) if a > 0 and b > 0]
    if len(ratios) < 2:
        return None
    mean = statistics.fmean(ratios)
    half = _T975[min(len(ratios) - 1, len(_T975)) - 1] * statistics.stdev(ratios) / math.sqrt(len(ratios))
    return math.exp(mean - half) - 1, math.exp(mean + half) - 1


def _table(rows: list[dict[str, Any]], labels: list[str]) -> str:
    head = ["layout", "telemetry", "path"]
    for label in labels:
        head += [f"{label} CPU ms/call", f"{label} rounds", f"{label} calls/s", f"{label} p50/p99/max ms"]
    if len(labels) == 2:
        head.append("change")
    else:
        head += [f"{label} vs {labels[0]}" for label in labels[1:]]
    spans = f"spans/call ({labels[-1]})"
    if any(row[label]["spans_per_call"] for row in rows for label in labels):
        head.append(spans)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for row in rows:
        cells = [row["layout"], row["telemetry"], _path_name(row["path"])]
        for label in labels:
            data = row[label]
            failed = f" ({data['failures']} failed)" if data["failures"] else ""
            cells += [
                f"{data['cpu_ms_per_call']:.2f}{failed}",
                " / ".join(f"{v:.2f}" for v in data["rounds_ms"]),
                "-" if data["calls_per_s"] is None else f"{data['calls_per_s']:.0f}",
                _latency_cell(data.get("latency_ms")),
            ]
        old = row[labels[0]]["cpu_ms_per_call"]
        for label in labels[1:]:
            new = row[label]["cpu_ms_per_call"]
            interval = paired_interval(row[labels[0]]["rounds_ms"], row[label]["rounds_ms"])
            within = f" [{100 * interval[0]:+.0f}, {100 * interval[1]:+.0f}]" if interval else ""
            cells.append(f"{100 * (new - old) / old:+.0f}%{within}" if old else "")
        if spans in head:
            cells.append(f"{row[labels[-1]]['spans_per_call']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chat_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=120, help="completed chats per path, round and tree")
    parser.add_argument(
        "--noop-calls",
        type=int,
        default=1000,
        help="health checks (and direct router calls) per round and tree",
    )
    parser.add_argument(
        "--stream-calls",
        type=int,
        default=300,
        help="streamed router calls per round and tree (paths stream10, stream100, router-stream)",
    )
    parser.add_argument(
        "--stream-pace-ms",
        type=float,
        default=0.0,
        help="milliseconds between a stream's chunks (0: all at once, like the zero-latency sim of the "
        "other paths; more: each chunk arrives and is relayed on its own, as from a real provider)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="batches per path and tree (order alternates)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--layouts", type=lambda s: s.split(","), default=["one", "split"])
    parser.add_argument("--telemetry", type=lambda s: s.split(","), default=["off", "export"])
    parser.add_argument("--paths", type=lambda s: s.split(","), default=list(PATHS))
    parser.add_argument(
        "--session-exact-only",
        action="store_true",
        help="session chats ask for CACHE_MODE_EXACT_ONLY (no semantic lookup, so no embedding)",
    )
    parser.add_argument("--baseline", default="", help="a git revision to measure beside this tree")
    parser.add_argument(
        "--telemetry-side-by-side",
        action="store_true",
        help="this tree once per --telemetry setting, the settings alternating (no --baseline)",
    )
    parser.add_argument("--py-spy", type=Path, default=None, help="folder for py-spy profiles of this tree")
    parser.add_argument("--py-spy-rate", type=int, default=100, help="with --py-spy: samples per second")
    parser.add_argument(
        "--py-spy-native",
        action="store_true",
        help="with --py-spy: native frames too (pauses the process at each sample: much slower chats)",
    )
    parser.add_argument("--output", default="chat_cpu", help="name of the results files under bench/results")
    parser.add_argument("--otlp-sink", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--sink-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.otlp_sink:
        run_sink(args.otlp_sink, args.sink_file)
        return 0
    args.paths = [name for path in args.paths for name in STREAM_PATHS.get(path, (path,))]
    for value, known, what in (
        (args.layouts, ("one", "split"), "--layouts"),
        (
            [_telemetry_base(t) for t in args.telemetry],
            ("off", "export", "sampled", "disabled"),
            "--telemetry",
        ),
        (args.paths, (*PATHS, *STREAM_PATHS), "--paths"),
    ):
        unknown = sorted(set(value) - set(known))
        if unknown:
            parser.error(f"{what}: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    for setting in args.telemetry:
        for name in _telemetry_variables(setting):
            prefix = next((p for p in ("OTEL_", "BALLAST_") if name.startswith(p)), "")
            if not prefix or not name[len(prefix) :].replace("_", "").isalnum():
                parser.error(
                    f"--telemetry {setting}: {name!r} is not an OTEL_* or BALLAST_* variable"
                    " (setting+NAME=value)"
                )
    if min(args.chats, args.noop_calls, args.stream_calls, args.rounds, args.concurrency) < 1:
        parser.error("--chats, --noop-calls, --stream-calls, --rounds and --concurrency must be at least 1")
    if args.stream_pace_ms < 0:
        parser.error("--stream-pace-ms must not be negative")
    if args.telemetry_side_by_side and (args.baseline or len(args.telemetry) < 2):
        parser.error("--telemetry-side-by-side: two or more --telemetry settings and no --baseline")
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    # A stopped benchmark still stops its suites, sim and collector (the finally blocks below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="chat_cpu-") as tmp:
        folder = Path(tmp)
        trees = [("now", ROOT)]
        if args.baseline:
            # A branch name moves while others merge: record the commit that was measured.
            resolved = subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline],
                capture_output=True,
                text=True,
                check=True,
            )
            args.baseline = f"{args.baseline} ({resolved.stdout.strip()})"
            trees.insert(0, ("base", baseline_tree(resolved.stdout.strip(), folder)))
        helpers: list[subprocess.Popen[bytes]] = []
        sim_port, stream_sim_port, sink_port = _free_port(), _free_port(), _free_port()
        sink_file = folder / "spans"
        try:
            helpers.append(subprocess.Popen(instant_sim(sim_port), cwd=ROOT, stdout=subprocess.DEVNULL))
            _wait_port(sim_port, helpers[-1])
            if any(path in STREAM_CHUNKS for path in args.paths):
                streaming = [
                    *instant_sim(stream_sim_port, "sim-stream"),
                    "--answer-pieces",
                    str(STREAM_SIM_PIECES),
                ]
                if args.stream_pace_ms > 0:  # the sim's last --tokens-per-second wins
                    streaming += ["--tokens-per-second", str(1000 / args.stream_pace_ms)]
                helpers.append(subprocess.Popen(streaming, cwd=ROOT, stdout=subprocess.DEVNULL))
                _wait_port(stream_sim_port, helpers[-1])
            if EXPORTING & {_telemetry_base(setting) for setting in args.telemetry}:
                helpers.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "bench.chat_cpu",
                            "--otlp-sink",
                            str(sink_port),
                            "--sink-file",
                            str(sink_file),
                        ],
                        cwd=ROOT,
                    )
                )
                _wait_port(sink_port, helpers[-1])
            for layout in args.layouts:
                # Each group of suites is measured together, alternating: the trees, per setting,
                # or with --telemetry-side-by-side this tree's settings.
                groups = (
                    [[(telemetry, ROOT, telemetry) for telemetry in args.telemetry]]
                    if args.telemetry_side_by_side
                    else [[(label, root, telemetry) for label, root in trees] for telemetry in args.telemetry]
                )
                for group in groups:
                    suites = [
                        Suite(label, root, layout, telemetry, sim_port, stream_sim_port, sink_port, folder)
                        for label, root, telemetry in group
                    ]
                    try:
                        for suite in suites:
                            suite.start_retrying()
                        rows += asyncio.run(_measure_config(args, suites, sink_file))
                    finally:
                        for suite in suites:
                            suite.stop()
        finally:
            for helper in helpers:
                helper.terminate()
                helper.wait(timeout=30)
            if args.baseline:
                remove_baseline_tree(folder)
    labels = list(args.telemetry) if args.telemetry_side_by_side else [label for label, _ in trees]
    table = _table(rows, labels)
    print(table)
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    lines = [
        "# Suite CPU per completed chat (bench/chat_cpu.py)",
        "",
        f"Command: `python -m bench.chat_cpu {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {platform.platform()}, {cpu_description()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"now = {head.stdout.strip()} (with uncommitted changes, if any)"
        + (f"; base = {args.baseline}" if args.baseline else ""),
        "",
        f"CPU seconds (utime + stime) of the suite's process tree per completed call, {args.chats} chats "
        f"({args.noop_calls} health checks or direct router calls, {args.stream_calls} router streams) per round at concurrency {args.concurrency}, {args.rounds} rounds "
        f"per tree, alternating; stream chunks {args.stream_pace_ms:g} ms apart. SIMULATED provider at zero latency; memory stores; the client and the sim "
        "are not counted. `off` = no OTEL_* variable (no exporter); `export` = OTLP/gRPC to a local "
        "collector process; `sampled` = `export` keeping one trace in ten. A change is the pooled CPU"
        " per call against the first column's, with a 95% interval in brackets from the rounds paired"
        " as they ran (this machine's speed drifts between rounds: a change inside its interval's"
        " reach of zero is not one).",
        "",
        table,
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.output}.md").write_text("\n".join(lines))
    (RESULTS / f"{args.output}.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
