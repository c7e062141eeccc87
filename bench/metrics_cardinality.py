"""How many series each service exports after a surge, and how that grows with users: the
cardinality Prometheus pays for, with BALLAST_METRICS_PER_USER off (the default) and on.

    .venv/bin/python -m bench.metrics_cardinality [--users 16,64] [--duration 12]

For each user count and setting, starts the whole suite in this process on 127.0.0.1 with
simulated providers, drives a short surge (the primary provider down for a third of it), then
reads every service's /metrics: series (samples, counting each histogram bucket), bytes and
the time to render it. Results go to bench/results/metrics_cardinality.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ballast_demo.load import run_surge
from ballast_demo.scenario import ScenarioConfig, plan_users, write_suite_config
from services.kit.config import SERVICE_NAMES
from services.testing import start_suite
from tests.support.backends import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
ADMIN = "bench-admin"


async def _run(users: int, per_user: bool, duration: float) -> dict[str, Any]:
    config = ScenarioConfig(
        duration_s=duration,
        ramp_s=duration / 3,
        start_users=max(1, users // 4),
        peak_users=users,
        think_s=(0.3, 0.8),
        outage_start_s=duration / 3,
        outage_s=duration / 3,
        primary_latency_ms=20,
        secondary_latency_ms=40,
        tokens_per_second=5000,
        free_requests=1000,
    ).with_ports(free_port(), free_port())
    with tempfile.TemporaryDirectory() as folder:
        environ = {
            **write_suite_config(Path(folder), config, ROOT),
            "BALLAST_EDGE_ADMIN_KEY": ADMIN,
            "BALLAST_METRICS_PER_USER": "true" if per_user else "false",
        }
        suite = await start_suite(SERVICE_NAMES, environ)
        try:
            state = await run_surge(
                suite.channel("edge"), suite.channel("router"), ADMIN, config, plan_users(config)
            )
            services: dict[str, dict[str, float]] = {}
            async with httpx.AsyncClient() as client:
                for name, running in suite.running.items():
                    started = time.perf_counter()
                    text = (await client.get(f"http://127.0.0.1:{running.metrics_port}/metrics")).text
                    elapsed = time.perf_counter() - started
                    samples = sum(len(f.samples) for f in text_string_to_metric_families(text))
                    services[name] = {"series": samples, "bytes": len(text), "scrape_ms": elapsed * 1000}
        finally:
            await suite.stop()
    return {"users": users, "per_user": per_user, "requests": len(state.events), "services": services}


def _markdown(rows: list[dict[str, Any]], duration: float) -> str:
    lines = [
        f"# Metrics cardinality after a {duration:g}s surge",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {platform.machine()}, Python {platform.python_version()};"
        " `python -m bench.metrics_cardinality`. Series are exposition samples (each histogram"
        " bucket counts); scrape time is one /metrics request from the same process.",
        "",
        "| users | per-user labels | requests | "
        + " | ".join(f"{n} series" for n in SERVICE_NAMES)
        + " | edge bytes | edge scrape ms |",
        "|---:|---|---:|" + "---:|" * (len(SERVICE_NAMES) + 2),
    ]
    for row in rows:
        services = row["services"]
        cells = " | ".join(str(int(services[n]["series"])) for n in SERVICE_NAMES)
        lines.append(
            f"| {row['users']} | {'on' if row['per_user'] else 'off'} | {row['requests']} | {cells} |"
            f" {int(services['edge']['bytes'])} | {services['edge']['scrape_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"


async def main(users: list[int], duration: float) -> None:
    rows = []
    for count in users:
        for per_user in (False, True):
            rows.append(await _run(count, per_user, duration))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "services"}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "metrics_cardinality.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = _markdown(rows, duration)
    (RESULTS / "metrics_cardinality.md").write_text(table)
    print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", default="16,64", help="peak users per run, comma-separated")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds of load per run")
    args = parser.parse_args()
    asyncio.run(main([int(n) for n in args.users.split(",")], args.duration))
