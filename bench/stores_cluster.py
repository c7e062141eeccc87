"""The cache's and the queue's Redis stores on one Redis and on a Redis Cluster, side by side.

    .venv/bin/python -m bench.stores_cluster [--seconds 3] [--concurrency 32] [--rounds 2] [--tenants 50]

Starts a private redis-server and a private three-primary cluster (each primary with a replica,
as the tests run it) and, alternating between them round by round, measures from one client
process: cache Store (`RedisStore.put`, an answer with a 384-float vector), cache Lookup
(`RedisStore.get`, exact tier, entries present) and queue submit (`RedisEdgeStore.submit`), each
for `--seconds` at `--concurrency` concurrent callers over `--tenants` tenants. Prints operations
per second (the median of the rounds) and writes bench/results/stores_cluster.{md,json}.

One client process on a small machine is bound by the client's CPU, not by Redis: the figures
compare what a replica pays per call (one shard's client or the cluster client's routing, and on a
cluster a Store's second call to the `{cache}` shard), not what a cluster can serve in total.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from services.cache.index import AnnParams
from services.cache.store import Entry, StoreOptions
from services.cache.store.base import KIND_ANSWER
from services.cache.store.redis import RedisStore
from services.edge.store import JobRecord
from services.edge.store.redis import RedisEdgeStore
from tests.support.backends import private_redis, private_redis_cluster

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DIM = 384


def _entry(tenant: str, key: str, vector: np.ndarray) -> Entry:
    now = time.time()
    return Entry(
        id=uuid.uuid4().hex,
        kind=KIND_ANSWER,
        tenant_id=tenant,
        namespace="default",
        key=key,
        payload=b"x" * 600,
        created_at=now,
        expires_at=now + 3600,
        partition=f"p-{tenant}",
        text=f"question {key}",
        vector=vector,
    )


async def _rate(seconds: float, concurrency: int, call: Callable[[int], Awaitable[Any]]) -> float:
    """Calls per second of `concurrency` loops calling `call(n)` for `seconds`."""
    done = 0
    stop = time.perf_counter() + seconds

    async def loop(worker: int) -> None:
        nonlocal done
        n = worker
        while time.perf_counter() < stop:
            await call(n)
            n += concurrency
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(concurrency)))
    return done / (time.perf_counter() - started)


async def _round(url: str, seconds: float, concurrency: int, tenants: int) -> dict[str, float]:
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    sep = "&" if "?" in url else "?"
    scoped = f"{url}{sep}key_prefix={prefix}"
    cache = RedisStore(scoped, StoreOptions(dim=DIM, ann=AnnParams(threshold=1_000_000), timeout=30.0))
    edge = RedisEdgeStore(scoped, socket_timeout=30.0)
    await cache.start()
    await edge.start()
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((256, DIM)).astype(np.float32)
    try:
        out: dict[str, float] = {}

        async def store(n: int) -> None:
            tenant = f"tenant-{n % tenants}"
            await cache.put(_entry(tenant, f"k{n}", vectors[n % 256]), time.time())

        out["cache Store"] = await _rate(seconds, concurrency, store)
        stored = 2000
        for n in range(stored):
            await store(n)

        async def lookup(n: int) -> None:
            m = n % stored
            assert await cache.get(f"tenant-{m % tenants}", f"k{m}", time.time()) is not None

        out["cache Lookup"] = await _rate(seconds, concurrency, lookup)

        async def submit(n: int) -> None:
            job = JobRecord(
                job_id=uuid.uuid4().hex,
                tenant_id=f"tenant-{n % tenants}",
                user_id="u",
                priority="normal",
                request=b"r" * 200,
                caller=b"c",
                created_at=time.time(),
            )
            await edge.submit(job, "")

        out["queue submit"] = await _rate(seconds, concurrency, submit)
        return out
    finally:
        await cache.close()
        await edge.close()


def _markdown(results: dict[str, dict[str, list[float]]], meta: dict[str, Any]) -> str:
    lines = [
        "# Cache and queue stores: one Redis and a Redis Cluster",
        "",
        f"`python -m bench.stores_cluster --seconds {meta['seconds']} --concurrency {meta['concurrency']} "
        f"--rounds {meta['rounds']} --tenants {meta['tenants']}`; {meta['machine']}, {meta['cpus']} CPUs, "
        f"load {meta['load']}, Python {meta['python']}, redis-py {meta['redis_py']}. One client process; "
        "operations per second, median of the rounds (each round's figures in brackets).",
        "",
        "| operation | one Redis | Redis Cluster (3 primaries + 3 replicas) |",
        "|---|---|---|",
    ]
    for op in results["redis"]:
        cells = []
        for target in ("redis", "cluster"):
            rounds = results[target][op]
            cells.append(f"{statistics.median(rounds):,.0f} ({', '.join(f'{r:,.0f}' for r in rounds)})")
        lines.append(f"| {op} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


async def _main(seconds: float, concurrency: int, rounds: int, tenants: int) -> None:
    meta = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "redis_py": importlib.metadata.version("redis"),
        "seconds": seconds,
        "concurrency": concurrency,
        "rounds": rounds,
        "tenants": tenants,
    }
    results: dict[str, dict[str, list[float]]] = {"redis": {}, "cluster": {}}
    with contextlib.ExitStack() as stack:
        single = stack.enter_context(private_redis())
        cluster = stack.enter_context(private_redis_cluster(masters=3, replicas=1))
        urls = {"redis": single.url, "cluster": cluster.url}
        for r in range(rounds):
            for target in ("redis", "cluster") if r % 2 == 0 else ("cluster", "redis"):
                figures = await _round(urls[target], seconds, concurrency, tenants)
                for op, value in figures.items():
                    results[target].setdefault(op, []).append(value)
                print(f"round {r + 1} {target}: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in figures.items()))
    markdown = _markdown(results, meta)
    print(markdown)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stores_cluster.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (RESULTS / "stores_cluster.md").write_text(markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tenants", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(_main(args.seconds, args.concurrency, args.rounds, args.tenants))


if __name__ == "__main__":
    main()
