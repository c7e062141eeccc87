"""What the edge adds on top of a direct router call, for a cache miss and a cache hit.

    .venv/bin/python -m bench.edge_latency [--requests 300] [--concurrency 1,16,64] [--backends memory,real]

Starts the whole suite in this process on 127.0.0.1 (the simulated provider answers at
zero latency), then for each concurrency measures, over the same messages:
  router   router.Complete called directly (the baseline)
  miss     edge.Chat with a new question each time (limiter, cache lookup, router, cache store, commit)
  hit      edge.Chat with a question already cached (limiter, cache lookup, commit)
`memory` runs every service on its embedded default; `real` puts the limiter, cache and edge
queue on Redis (127.0.0.1:6379) and sessions on PostgreSQL (127.0.0.1:5432). Client and servers
share one Python process (and its GIL), so absolute numbers are pessimistic; the differences
are what the edge costs. Results go to bench/results/edge_latency.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2
from ballast.router.v1 import router_pb2

from services.kit.config import SERVICE_NAMES
from services.testing import Suite, start_suite
from tests.support.suite_config import ADMIN_KEY, write_test_config

RESULTS = Path(__file__).resolve().parent / "results"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _measure(
    call: Callable[[int], Awaitable[Any]], requests: int, concurrency: int
) -> dict[str, float]:
    latencies: list[float] = []
    counter = iter(range(requests))

    async def worker() -> None:
        for index in counter:
            started = time.perf_counter()
            await call(index)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "p50_ms": statistics.median(latencies),
        "p99_ms": _percentile(latencies, 0.99),
        "rps": len(latencies) / elapsed,
    }


def _message(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)


async def _run(backend: str, requests: int, concurrencies: list[int]) -> list[dict[str, Any]]:
    folder = Path(tempfile.mkdtemp(prefix="ballast-bench-"))
    environ = write_test_config(folder, sim_latency_ms=0.0)
    if backend == "real":
        prefix = f"bench:{uuid.uuid4().hex[:8]}:"
        redis = os.environ.get("BALLAST_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
        environ.update(
            {
                "BALLAST_LIMITER_STORE": f"{redis}?key_prefix={prefix}",
                "BALLAST_CACHE_STORE": f"{redis}?key_prefix={prefix}",
                "BALLAST_EDGE_STORE": f"{redis}?key_prefix={prefix}",
                "BALLAST_SESSIONS_STORE": os.environ.get(
                    "BALLAST_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
                ),
            }
        )
    environ["BALLAST_LOG_LEVEL"] = "warning"
    suite: Suite = await start_suite(SERVICE_NAMES, environ)
    rows: list[dict[str, Any]] = []
    try:
        created = await suite.edge_admin.CreateApiKey(
            edge_pb2.CreateApiKeyRequest(
                tenant_id="bench-" + secrets.token_hex(4), user_id="u", tier="enterprise"
            ),
            metadata=(("x-admin-key", ADMIN_KEY),),
        )
        auth = (("authorization", f"Bearer {created.api_key}"),)
        run_id = secrets.token_hex(4)
        cached_question = f"What are your opening hours? ({run_id})"
        await suite.edge.Chat(edge_pb2.ChatRequest(messages=[_message(cached_question)]), metadata=auth)

        async def router_call(i: int) -> Any:
            request = router_pb2.CompleteRequest(messages=[_message(f"router question {run_id} {i}")])
            return await suite.router.Complete(request)

        async def miss(i: int) -> Any:
            request = edge_pb2.ChatRequest(
                messages=[_message(f"edge question {run_id} {i} {secrets.token_hex(3)}")]
            )
            return await suite.edge.Chat(request, metadata=auth)

        async def hit(i: int) -> Any:
            response = await suite.edge.Chat(
                edge_pb2.ChatRequest(messages=[_message(cached_question)]), metadata=auth
            )
            assert response.cache_hit
            return response

        for concurrency in concurrencies:
            await _measure(router_call, min(50, requests), concurrency)  # warm-up
            baseline = await _measure(router_call, requests, concurrency)
            for path, call in (("miss", miss), ("hit", hit)):
                measured = await _measure(call, requests, concurrency)
                rows.append(
                    {
                        "backend": backend,
                        "path": path,
                        "concurrency": concurrency,
                        "router_p50_ms": baseline["p50_ms"],
                        "router_p99_ms": baseline["p99_ms"],
                        "edge_p50_ms": measured["p50_ms"],
                        "edge_p99_ms": measured["p99_ms"],
                        "added_p50_ms": measured["p50_ms"] - baseline["p50_ms"],
                        "added_p99_ms": measured["p99_ms"] - baseline["p99_ms"],
                        "edge_rps": measured["rps"],
                        "router_rps": baseline["rps"],
                    }
                )
                print(_row(rows[-1]), flush=True)
    finally:
        await suite.stop()
    return rows


HEADER = (
    "| backend | path | conc | router p50 | router p99 | edge p50 | edge p99 | added p50 | added p99 | edge req/s |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _row(r: dict[str, Any]) -> str:
    return (
        f"| {r['backend']} | {r['path']} | {r['concurrency']} | {r['router_p50_ms']:.2f} | {r['router_p99_ms']:.2f} | "
        f"{r['edge_p50_ms']:.2f} | {r['edge_p99_ms']:.2f} | {r['added_p50_ms']:+.2f} | {r['added_p99_ms']:+.2f} | "
        f"{r['edge_rps']:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--backends", default="memory,real")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    print(HEADER)
    rows: list[dict[str, Any]] = []
    for backend in args.backends.split(","):
        rows.extend(asyncio.run(_run(backend, args.requests, concurrencies)))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    table = "\n".join([HEADER, *(_row(r) for r in rows)])
    (RESULTS / "edge_latency.md").write_text(
        f"# Edge added latency\n\n{stamp}; {machine}; {args.requests} requests per cell; "
        f"milliseconds; simulated provider at zero latency.\n\n{table}\n"
    )
    (RESULTS / "edge_latency.json").write_text(
        json.dumps({"when": stamp, "machine": machine, "requests": args.requests, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
