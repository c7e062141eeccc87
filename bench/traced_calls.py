"""What tracing costs one in-process gRPC call, apart from any service's own work.

Run: .venv/bin/python -m bench.traced_calls [--rounds 6] [--calls 3000] [--concurrency 8] [--baseline REV]

A service with one trivial method (echo) behind the real server interceptors and the
in-process channel (services/kit/local.py), called `--calls` times per round from
`--concurrency` callers, with telemetry:
- `off`: no exporter configured (no spans are made);
- `unsampled`: exporting, OTEL_TRACES_SAMPLER=parentbased_traceidratio with ratio 0 (every
  trace decided, none kept: what nine calls in ten pay under one-in-ten sampling);
- `export`: every trace exported over OTLP/gRPC to a local collector process.
Each setting runs in its own process per round (the SDK reads the sampler from the process
environment), the settings alternating. The export queue holds every span of a round: a call
this cheap makes spans faster than one export thread sends them, and a full queue would measure
the SDK's dropping (a warning per span) instead of the export. Printed per setting: CPU per call
of the event loop's thread and of the whole process (the export thread included, and one second
after the calls for the last export: idle threads add a few us a call), medians of the rounds.
`--baseline REV` runs REV's code (a git worktree) beside this tree's, the trees alternating
within each round. Writes bench/results/traced_calls.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from bench.support import (
    ROOT,
    baseline_tree,
    collector_variables,
    cpu_description,
    remove_baseline_tree,
    save_results,
    suite_pythonpath,
)
from services.kit.net import free_port

SERVICE = "ballast.bench.v1.Echo"
SETTINGS = ("off", "unsampled", "export")
WARM_UP_CALLS = 200


def _environment(setting: str, sink_port: int, calls: int, tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join(suite_pythonpath(tree))
    if setting != "off":
        # `unsampled`: decided as under one-in-ten sampling, with none kept (the root by the
        # ratio, its children by their parent).
        env.update(collector_variables(sink_port, "0" if setting == "unsampled" else None))
        env["OTEL_METRICS_EXPORTER"] = "none"
        env["OTEL_BSP_MAX_QUEUE_SIZE"] = str(2 * (calls + WARM_UP_CALLS) + 1024)  # two spans a call
    return env


async def _measure(calls: int, concurrency: int) -> dict[str, float]:
    from services.kit.clients import open_channel
    from services.kit.config import ServerSettings
    from services.kit.server import ServiceApp, start_service
    from services.kit.telemetry import setup_telemetry

    class Echo(ServiceApp):
        name = "echo"

        def service_names(self) -> Sequence[str]:
            return [SERVICE]

        def register(self, server: grpc.aio.Server) -> None:
            async def echo(request: bytes, context: Any) -> bytes:
                return request

            server.add_generic_rpc_handlers(
                [
                    grpc.method_handlers_generic_handler(
                        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
                    )
                ]
            )

    settings = ServerSettings(service="echo", port=0, grace_period=5.0, max_message_bytes=64 * 1024)
    app = Echo(settings, setup_telemetry("echo"))
    service = await start_service(app)
    channel = open_channel(service.address, app.server_settings, app.telemetry)
    echo: Any = channel.unary_unary(f"/{SERVICE}/Echo")

    async def caller(count: int) -> None:
        for _ in range(count):
            await echo(b"ping", timeout=30)

    await asyncio.gather(*(caller(WARM_UP_CALLS // concurrency) for _ in range(concurrency)))  # warm up
    process, loop_thread = time.process_time(), time.thread_time()
    await asyncio.gather(*(caller(calls // concurrency) for _ in range(concurrency)))
    loop_cpu = time.thread_time() - loop_thread
    await asyncio.sleep(1.0)  # the export thread sends the last batch (every 0.5 s)
    process_cpu = time.process_time() - process
    done = concurrency * (calls // concurrency)
    await channel.close()
    await service.stop(0.1)
    app.telemetry.shutdown()
    return {"loop_us": 1e6 * loop_cpu / done, "process_us": 1e6 * process_cpu / done}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--baseline", default="", help="a git revision to measure beside this tree")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.calls < args.concurrency or args.rounds < 1:
        parser.error("--calls must be at least --concurrency, and --rounds at least 1")
    if args.child:
        print(json.dumps(asyncio.run(_measure(args.calls, args.concurrency))))
        return 0
    sink_port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        trees = [("now", ROOT)]
        if args.baseline:
            trees.insert(0, ("base", baseline_tree(args.baseline, Path(folder))))
        sink = subprocess.Popen(
            [
                *(sys.executable, "-m", "bench.chat_cpu", "--otlp-sink", str(sink_port)),
                "--sink-file",
                str(Path(folder, "spans")),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        runs: dict[str, list[dict[str, float]]] = {_key(t, s): [] for t, _ in trees for s in SETTINGS}
        try:
            for round_ in range(args.rounds):
                order = SETTINGS if round_ % 2 == 0 else tuple(reversed(SETTINGS))
                for setting in order:
                    for label, tree in trees if round_ % 2 == 0 else trees[::-1]:
                        command = [sys.executable, "-m", "bench.traced_calls", "--child"]
                        command += ["--calls", str(args.calls), "--concurrency", str(args.concurrency)]
                        done = subprocess.run(
                            command,
                            cwd=tree,
                            env=_environment(setting, sink_port, args.calls, tree),
                            check=True,
                            capture_output=True,
                            text=True,
                        )
                        key = _key(label, setting)
                        runs[key].append(json.loads(done.stdout.strip().splitlines()[-1]))
                        print(f"  r{round_} {key:<14} {runs[key][-1]}", file=sys.stderr, flush=True)
        finally:
            sink.terminate()
            sink.wait(timeout=30)
            if args.baseline:
                remove_baseline_tree(Path(folder))
    base = f" beside {args.baseline} (`base`)" if args.baseline else ""
    lines = [
        "# Tracing's cost per in-process gRPC call (bench/traced_calls.py)",
        "",
        f"Command: `python -m bench.traced_calls {' '.join(sys.argv[1:])}`",
        "",
        f"{cpu_description()}, {os.cpu_count()} CPUs; {args.calls} calls of a trivial method per round "
        f"from {args.concurrency} callers, {args.rounds} rounds, settings alternating, each in its own "
        f"process{base}. Medians of the rounds, each round in brackets; `added` is the setting's "
        "process CPU less `off`'s, paired by round.",
        "",
        "| tree | telemetry | event loop's CPU per call (us) | process CPU per call (us) | added (us) |",
        "|---|---|---:|---:|---:|",
    ]
    data: dict[str, Any] = {"cpu": cpu_description(), "args": vars(args), "runs": runs}
    for label, _ in trees:
        off = [r["process_us"] for r in runs[_key(label, "off")]]
        for setting in SETTINGS:
            found = runs[_key(label, setting)]
            loop = [r["loop_us"] for r in found]
            whole = [r["process_us"] for r in found]
            added = statistics.median(w - o for w, o in zip(whole, off, strict=True))
            lines.append(
                f"| {label} | {setting} | {statistics.median(loop):.1f} ({' / '.join(f'{v:.0f}' for v in loop)}) "
                f"| {statistics.median(whole):.1f} ({' / '.join(f'{v:.0f}' for v in whole)}) "
                f"| {'' if setting == 'off' else f'{added:+.1f}'} |"
            )
    text = "\n".join(lines)
    print(text)
    save_results("traced_calls", text, data)
    return 0


def _key(tree: str, setting: str) -> str:
    return f"{tree} {setting}"


if __name__ == "__main__":
    raise SystemExit(main())
