"""`ballast demo`: the front-page surge in about a minute, on embedded defaults.

Starts the whole suite (`ballast up`, every service on its own port, SIMULATED providers),
drives the surge through the public API with a live progress line, prints a summary by tier,
writes a chart, and leaves the suite running for your own client or grpcurl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ballast_demo import report
from ballast_demo.load import LoadState, run_surge
from ballast_demo.scenario import ScenarioConfig, demo, plan_users, write_suite_config
from services.kit.config import DEFAULT_PORTS
from services.kit.net import free_port

ROOT = Path(__file__).resolve().parents[1]


def _busy(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def _wait_healthy(ports: list[int], process: subprocess.Popen[bytes], within: float = 120.0) -> None:
    deadline = time.monotonic() + within
    for port in ports:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if process.poll() is not None:
                    raise SystemExit(f"the suite exited with code {process.returncode}; see its log")
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"the suite did not become healthy on port {port} in {within:.0f}s")
                await asyncio.sleep(0.25)


async def _drive(config: ScenarioConfig, admin_key: str, quiet: bool) -> LoadState:
    users = plan_users(config)
    tty = sys.stdout.isatty()

    async def tick(state: LoadState) -> None:
        if quiet:
            return
        line = report.progress_line(state)
        print(("\r" + line[:160].ljust(160)) if tty else line, end="" if tty else "\n", flush=True)

    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{DEFAULT_PORTS['edge']}") as edge,
        grpc.aio.insecure_channel(f"127.0.0.1:{DEFAULT_PORTS['router']}") as router,
    ):
        state = await run_surge(edge, router, admin_key, config, users, on_tick=tick)
    if tty and not quiet:
        print()
    return state


def write_report(state: LoadState, config: ScenarioConfig, out: Path) -> None:
    rows = report.tier_rows(state.events, config)
    table = report.markdown_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    charted = report.plotting_available()
    if charted:
        report.chart(
            state.events, config, out / "surge.png", "Ballast demo: front-page surge (simulated providers)"
        )
    (out / "surge.md").write_text(f"# Ballast demo\n\n{table}\n")
    (out / "surge.json").write_text(
        json.dumps(
            {"config": asdict(config), "tiers": rows, "events": len(state.events)}, indent=2, default=str
        )
    )
    print(f"\nSurge of {config.start_users} → {config.peak_users} users over {config.ramp_s:.0f}s, "
          f"primary provider down from {config.outage_start_s:.0f}s to "
          f"{config.outage_start_s + config.outage_s:.0f}s (SIMULATED providers):\n")  # fmt: skip
    print(table)
    if charted:
        print(f"\nChart: {out / 'surge.png'}   Tables: {out / 'surge.md'}, {out / 'surge.json'}")
    else:
        print(f"\nTables: {out / 'surge.md'}, {out / 'surge.json'}")
        print("No chart: plotting is an optional extra (pip install 'ballast[demo]').")


# How long the suite may drain after Ctrl-C before it is killed (a second Ctrl-C kills it at once).
STOP_GRACE_S = 30.0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ballast demo", description=__doc__)
    parser.add_argument("--users", type=int, help="peak concurrent users (default: 150)")
    parser.add_argument("--duration", type=float, help="seconds of load (default: 60)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "demo-output", help="where the chart and tables go"
    )
    parser.add_argument("--exit", action="store_true", help="stop the suite when the run ends")
    parser.add_argument("--quiet", action="store_true", help="no live progress line")
    args = parser.parse_args(argv)
    config = demo()
    if args.users:
        config = replace(config, peak_users=args.users, start_users=min(config.start_users, args.users))
    if args.duration:
        config = config.stretched(args.duration)
    taken = [p for p in DEFAULT_PORTS.values() if _busy(p)]
    if taken:
        print(f"ballast demo: ports {taken} are in use (is a suite already running?)", file=sys.stderr)
        return 2
    config = config.with_ports(free_port(), free_port())
    folder = Path(tempfile.mkdtemp(prefix="ballast-demo-"))
    admin_key = "demo-admin-" + secrets.token_hex(8)
    env = {
        **os.environ,
        **write_suite_config(folder, config, ROOT),
        "BALLAST_EDGE_ADMIN_KEY": admin_key,
        # The demo keys the closing hints use (bk_demo_*); the suite listens on loopback only.
        "BALLAST_EDGE_KEYS_FILE": str(ROOT / "config" / "edge_keys.yaml"),
        "BALLAST_HOST": "127.0.0.1",
        "BALLAST_LOG_FORMAT": "text",
        "BALLAST_LOG_LEVEL": "warning",
        "BALLAST_EDGE_JOB_MAX_WAIT": f"{config.duration_s + 20:.0f}s",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "suite.log"
    print(f"Starting the suite (log: {log_path}) ...", flush=True)
    with log_path.open("wb") as log:
        suite = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up"], cwd=ROOT, env=env, stderr=log, stdout=log
        )
        try:
            asyncio.run(_wait_healthy(list(DEFAULT_PORTS.values()), suite))
            print("All five services are SERVING. Starting the surge.\n", flush=True)
            state = asyncio.run(_drive(config, admin_key, args.quiet))
            write_report(state, config, args.out)
            if args.exit:
                return 0
            print(
                "\nThe suite is still running on 127.0.0.1 (SIMULATED providers). Try:\n"
                "  grpcurl -plaintext 127.0.0.1:50051 list\n"
                "  grpcurl -plaintext -H 'authorization: Bearer bk_demo_paid' \\\n"
                '    -d \'{"messages":[{"role":"ROLE_USER","content":"How do I reset my password?"}]}\' \\\n'
                "    127.0.0.1:50051 ballast.edge.v1.EdgeService/Chat\n"
                "  curl -s 127.0.0.1:9451/metrics | grep ballast_\n"
                "Generated clients: compile protos/ballast/edge/v1/edge.proto for your language.\n"
                "Press Ctrl-C to stop.",
                flush=True,
            )
            signal.signal(signal.SIGTERM, _interrupt)
            while suite.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            suite.send_signal(signal.SIGTERM)
            try:
                suite.wait(timeout=STOP_GRACE_S)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                # The drain took too long, or a second Ctrl-C asked not to wait for it.
                suite.kill()
                suite.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
