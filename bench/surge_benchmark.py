"""The front-page surge at full size: Ballast against no gateway at all.

    .venv/bin/python -m bench.surge_benchmark [--users 1000] [--duration 150] [--modes direct,embedded,replicated]

The same seeded workload (ballast_demo/scenario.py: users of every tier on a ramp, multi-turn
sessions with tool calls, repeated and paraphrased questions; the primary provider rate-limited
and then down mid-run) is sent
  direct      straight to the SIMULATED primary provider over its OpenAI-format HTTP API
              (what an agent fleet without a gateway does: no failover, no cache, no queue)
  embedded    through Ballast, every service on its embedded defaults in one process (ballast up)
  replicated  through Ballast with two replicas of every service as separate processes, on
              Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432), clients balanced over both edges
Both simulated providers run as their own processes in every mode. Before each Ballast run,
a few enterprise users measure the unloaded p99, with the primary up and then down. Results: bench/results/surge.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml

from ballast_demo import report
from ballast_demo.load import Event, LoadState, run_surge
from ballast_demo.scenario import ScenarioConfig, UserPlan, full, plan_users, write_suite_config
from bench.support import healthy, start, stop
from services.kit.net import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SERVICES = ("router", "limiter", "cache", "sessions", "edge")


def _start_sims(config: ScenarioConfig, folder: Path) -> list[subprocess.Popen[bytes]]:
    sims = (
        (
            "sim-primary",
            config.primary_port,
            config.primary_latency_ms,
            config.primary_rpm,
            config.primary_tpm,
        ),
        (
            "sim-secondary",
            config.secondary_port,
            config.secondary_latency_ms,
            config.secondary_rpm,
            config.secondary_tpm,
        ),
    )
    return [
        start(
            [sys.executable, "-m", "services.router.sim", "--distribution", "lognormal",
             "--name", name, "--port", str(port), "--seed", str(seed),
             "--latency-ms", str(latency_ms), "--p99-ms", str(latency_ms * 4),
             "--tokens-per-second", str(config.tokens_per_second), "--rpm", str(rpm), "--tpm", str(tpm)],
            dict(os.environ),
            folder / f"{name}.log",
        )
        for seed, (name, port, latency_ms, rpm, tpm) in enumerate(sims, start=1)
    ]  # fmt: skip


async def _sims_ready(config: ScenarioConfig) -> None:
    async with httpx.AsyncClient() as client:
        for port in (config.primary_port, config.secondary_port):
            for _ in range(200):
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                        break
                await asyncio.sleep(0.1)


def _suite_env(config: ScenarioConfig, folder: Path, admin_key: str) -> dict[str, str]:
    files = write_suite_config(folder, config, ROOT)
    # Point the catalog's simulated providers at the standalone simulators.
    catalog = yaml.safe_load(Path(files["BALLAST_ROUTER_CATALOG_FILE"]).read_text())
    catalog["providers"]["sim-primary"]["base_url"] = f"http://127.0.0.1:{config.primary_port}/v1"
    catalog["providers"]["sim-secondary"]["base_url"] = f"http://127.0.0.1:{config.secondary_port}"
    Path(files["BALLAST_ROUTER_CATALOG_FILE"]).write_text(yaml.safe_dump(catalog, sort_keys=False))
    return {
        **os.environ,
        **files,
        "BALLAST_EDGE_ADMIN_KEY": admin_key,
        "BALLAST_LOG_LEVEL": "warning",
        "BALLAST_EDGE_JOB_MAX_WAIT": f"{config.duration_s + 20:.0f}s",
        "BALLAST_EDGE_MAX_IN_FLIGHT": "4096",
        "OTEL_SDK_DISABLED": "true",
        # The benchmark drives gRPC only; two edge replicas must not both claim HTTP port 8080.
        "BALLAST_EDGE_HTTP_PORT": "0",
    }


QUIET_HALF_S = 20.0  # the unloaded run: this long with the primary up, then as long with it down


def enterprise_p99(events: list[Event], config: ScenarioConfig) -> dict[str, float]:
    """Enterprise p99 of answered requests, apart for those sent while the primary was up and
    while it was down: failover sends the latter to the secondary, a slower provider, which no
    gateway can make faster; comparing like with like shows what the load itself costs."""
    start, end = config.outage_start_s, config.outage_start_s + config.outage_s
    ok = [e for e in events if e.tier == "enterprise" and e.outcome in ("ok", "cache_hit")]
    down = [e.latency for e in ok if start <= e.t - e.latency < end]
    up = [e.latency for e in ok if not start <= e.t - e.latency < end]
    return {
        "all": report.percentile([e.latency for e in ok], 0.99),
        "primary_up": report.percentile(up, 0.99),
        "primary_down": report.percentile(down, 0.99),
    }


async def _unloaded(
    edge: grpc.aio.Channel, router: grpc.aio.Channel, admin_key: str, config: ScenarioConfig
) -> dict[str, float]:
    """A few enterprise users alone, first with the primary up, then with it down."""
    quiet = replace(
        config,
        duration_s=2 * QUIET_HALF_S,
        ramp_s=0,
        start_users=8,
        peak_users=8,
        tier_mix=(0, 0, 1),
        outage_start_s=QUIET_HALF_S,
        outage_s=QUIET_HALF_S,
    )
    state = await run_surge(edge, router, admin_key, quiet, plan_users(quiet))
    return enterprise_p99(state.events, quiet)


async def _ballast(
    config: ScenarioConfig, users: list[UserPlan], edge_target: str, router_target: str, admin_key: str
) -> tuple[LoadState, dict[str, float]]:
    options = [("grpc.lb_policy_name", "round_robin")]
    async with (
        grpc.aio.insecure_channel(edge_target, options=options) as edge,
        grpc.aio.insecure_channel(router_target, options=options) as router,
    ):
        unloaded = await _unloaded(edge, router, admin_key, config)

        async def tick(state: LoadState) -> None:
            if int(state.now()) % 10 == 0:
                print("  " + report.progress_line(state), flush=True)

        state = await run_surge(edge, router, admin_key, config, users, on_tick=tick)
    return state, unloaded


async def run_embedded(
    config: ScenarioConfig, users: list[UserPlan], folder: Path
) -> tuple[LoadState, dict[str, float]]:
    admin_key = secrets.token_hex(8)
    env = _suite_env(config, folder, admin_key)
    ports = {name: free_port() for name in SERVICES}
    for name, port in ports.items():
        env[f"BALLAST_{name.upper()}_PORT"] = str(port)
        env[f"BALLAST_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
        env[f"BALLAST_{name.upper()}_METRICS_PORT"] = str(free_port())
    suite = start([sys.executable, "-m", "services.cli", "up"], env, folder / "suite.log")
    try:
        for port in ports.values():
            await healthy(f"127.0.0.1:{port}")
        return await _ballast(
            config, users, f"127.0.0.1:{ports['edge']}", f"127.0.0.1:{ports['router']}", admin_key
        )
    finally:
        stop([suite])


async def run_replicated(
    config: ScenarioConfig, users: list[UserPlan], folder: Path
) -> tuple[LoadState, dict[str, float]]:
    admin_key = secrets.token_hex(8)
    env = _suite_env(config, folder, admin_key)
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    redis = os.environ.get("BALLAST_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    dsn = os.environ.get("BALLAST_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    import asyncpg

    conn = await asyncpg.connect(dsn)
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    env.update(
        {
            "BALLAST_LIMITER_STORE": f"{redis}?key_prefix={prefix}",
            "BALLAST_CACHE_STORE": f"{redis}?key_prefix={prefix}",
            "BALLAST_EDGE_STORE": f"{redis}?key_prefix={prefix}",
            "BALLAST_SESSIONS_STORE": f"{dsn}?search_path={schema}",
            "BALLAST_LIMITER_REPLICAS": "2",
        }
    )
    ports = {name: [free_port(), free_port()] for name in SERVICES}
    for name, pair in ports.items():
        env[f"BALLAST_{name.upper()}_ADDR"] = ",".join(f"127.0.0.1:{p}" for p in pair)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for name in SERVICES:
            for replica, port in enumerate(ports[name]):
                replica_env = {**env, f"BALLAST_{name.upper()}_PORT": str(port), "BALLAST_METRICS": "false"}
                processes.append(
                    start(
                        [sys.executable, "-m", f"services.{name}"],
                        replica_env,
                        folder / f"{name}-{replica}.log",
                    )
                )
            for port in ports[name]:
                await healthy(f"127.0.0.1:{port}")
        edge_target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports["edge"])
        router_target = f"127.0.0.1:{ports['router'][0]}"
        return await _ballast(config, users, edge_target, router_target, admin_key)
    finally:
        stop(processes)
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


async def run_direct(config: ScenarioConfig, users: list[UserPlan]) -> tuple[LoadState, dict[str, float]]:
    """The same users and turns, each turn one HTTP call to the primary provider, no gateway."""
    from ballast_demo.load import script_outage

    state = LoadState()
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    url = f"http://127.0.0.1:{config.primary_port}/v1/chat/completions"
    headers = {"authorization": "Bearer sim"}

    async def user(plan: UserPlan, client: httpx.AsyncClient) -> None:
        await asyncio.sleep(plan.arrive_s)
        think = iter(plan.think)
        state.active_users += 1
        try:
            for session in plan.sessions:
                history: list[dict[str, Any]] = []
                for turn in session:
                    if state.now() >= config.duration_s:
                        return
                    history.append({"role": "user", "content": turn.text})
                    started = state.now()
                    outcome, code = "failed", "OK"
                    try:
                        reply = await client.post(
                            url, json={"model": "sim-small-1", "messages": history}, headers=headers,
                            timeout=config.deadline_s,
                        )  # fmt: skip
                        if reply.status_code == 200:
                            outcome = "ok"
                            history.append(reply.json()["choices"][0]["message"])
                        else:
                            code = f"HTTP_{reply.status_code}"
                    except httpx.HTTPError as exc:
                        code = type(exc).__name__
                    upstream_429 = 1 if code == "HTTP_429" else 0
                    state.events.append(
                        Event(t=state.now(), tier=plan.tier, latency=state.now() - started, outcome=outcome,
                              code=code, upstream_429s=upstream_429, attempts=1, kind=turn.kind)
                    )  # fmt: skip
                    await asyncio.sleep(next(think, 1.0))
        finally:
            state.active_users -= 1

    async def ticker() -> None:
        while True:
            await asyncio.sleep(10)
            print("  " + report.progress_line(state), flush=True)

    async with httpx.AsyncClient(limits=limits) as client:
        state.started = time.monotonic()
        extras = [asyncio.create_task(script_outage(config, state)), asyncio.create_task(ticker())]
        await asyncio.gather(*(user(plan, client) for plan in users))
        for task in extras:
            task.cancel()
    return state, {}  # no unloaded baseline: without a gateway there is no priority to keep


def _rows(mode: str, state: LoadState, config: ScenarioConfig) -> list[dict[str, Any]]:
    rows = report.tier_rows(state.events, config)
    for row in rows:
        mine = [e for e in state.events if row["tier"] in ("all", e.tier)]
        row["mode"] = mode
        # Lost: failed for any reason but a job still waiting in the queue when the run ended.
        row["lost"] = sum(1 for e in mine if e.outcome == "failed" and e.code != "STILL_QUEUED")
        row["upstream_429s_to_users"] = sum(1 for e in mine if e.code == "HTTP_429")
    return rows


def _enterprise_note(mode: str, p99s: dict[str, dict[str, float]]) -> str:
    unloaded, surge = p99s["unloaded"], p99s["surge"]
    parts = []
    for key, label in (
        ("primary_up", "primary up"),
        ("primary_down", "primary down (on the slower secondary)"),
    ):
        before, during = unloaded[key], surge[key]
        ratio = f" ({during / before:.1f}×)" if before > 0 else ""
        parts.append(f"{label}: unloaded {before:.2f}s, surge {during:.2f}s{ratio}")
    return f"- {mode}: enterprise p99 — " + "; ".join(parts) + f"; whole run {surge['all']:.2f}s"


HEADER = (
    "| mode | tier | requests | success | p50 s | p99 s | refused by tier | lost | lost in outage | still queued "
    "| upstream 429s | 429s to users | model calls saved | cost $ |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _line(r: dict[str, Any]) -> str:
    return (
        f"| {r['mode']} | {r['tier']} | {r['requests']} | {r['success_rate']:.1%} | {r['p50_s']:.2f} | {r['p99_s']:.2f} "
        f"| {r['limited']} | {r['lost']} | {r['failed_during_outage']} | {r['still_queued']} | {r['upstream_429s']} "
        f"| {r['upstream_429s_to_users']} | {r['cache_hits']} | {r['cost_usd']:.3f} |"
    )


async def main_async(args: argparse.Namespace) -> None:
    config = full()
    if args.users:
        config = replace(config, peak_users=args.users)
    if args.duration:
        config = config.stretched(args.duration)
    all_rows: list[dict[str, Any]] = []
    enterprise: dict[str, dict[str, dict[str, float]]] = {}
    for mode in args.modes.split(","):
        config = config.with_ports(free_port(), free_port())
        folder = Path(tempfile.mkdtemp(prefix=f"ballast-surge-{mode}-"))
        users = plan_users(config)
        print(
            f"== {mode}: {config.start_users} → {config.peak_users} users, {config.duration_s:.0f}s (logs: {folder})"
        )
        sims = _start_sims(config, folder)
        try:
            await _sims_ready(config)
            if mode == "direct":
                state, unloaded = await run_direct(config, users)
            elif mode == "embedded":
                state, unloaded = await run_embedded(config, users, folder)
            else:
                state, unloaded = await run_replicated(config, users, folder)
        finally:
            stop(sims)
        rows = _rows(mode, state, config)
        # Every answered request, for looking closer than the table does.
        (folder / "events.json").write_text(json.dumps([asdict(e) for e in state.events]))
        all_rows.extend(rows)
        for row in rows:
            print(_line(row), flush=True)
        if unloaded:
            enterprise[mode] = {"unloaded": unloaded, "surge": enterprise_p99(state.events, config)}
        report.chart(
            state.events, config, RESULTS / f"surge_{mode}.png", f"Surge through {mode} (SIMULATED providers)"
        )
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    notes = "\n".join(_enterprise_note(mode, p99s) for mode, p99s in enterprise.items())
    table = "\n".join([HEADER, *(_line(r) for r in all_rows)])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "surge.md").write_text(
        f"# Front-page surge\n\n{stamp}; {machine}; {config.start_users} → {config.peak_users} users over "
        f"{config.ramp_s:.0f}s, {config.duration_s:.0f}s in all; the primary (SIMULATED) provider limited to "
        f"{config.primary_rpm} RPM and down from {config.outage_start_s:.0f}s for {config.outage_s:.0f}s.\n\n"
        f"{table}\n\n{notes}\n"
    )
    (RESULTS / "surge.json").write_text(
        json.dumps(
            {
                "when": stamp,
                "machine": machine,
                "config": asdict(config),
                "rows": all_rows,
                "enterprise_p99_s": enterprise,
            },
            indent=2,
            default=str,
        )
    )
    print(notes)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, help="peak users (default 1000)")
    parser.add_argument("--duration", type=float, help="seconds (default 150)")
    parser.add_argument("--modes", default="direct,embedded,replicated")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
