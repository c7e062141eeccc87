"""Lookup latency of the cache: index search alone and with embedding, at 10k, 100k and 1M
entries in one partition, and a whole gRPC Lookup at 100k.

Run: .venv/bin/python -m bench.cache_lookup [--quick]   (--quick skips 1M; the full run takes
a few minutes, most of it building the 1M-entry HNSW graph). Writes bench/results/cache_lookup.{md,json}.

    .venv/bin/python -m bench.cache_lookup --baseline main [--rounds 2]
only times the gRPC Lookup at 100k entries (memory store), this tree against the `--baseline` git
ref exported with `git archive` (its own gen/ first on the path), each run in its own process,
alternating round by round. Writes bench/results/cache_lookup_ab.{md,json}.

Sizes use random normalised 384-d vectors (the worst case for an HNSW graph); queries are
fresh random vectors. The index is exact (numpy) below BALLAST_CACHE_ANN_THRESHOLD (20k by
default) and HNSW above it, as in the service. "With embedding" adds the local MiniLM
embedding of a real query sentence to each search. The gRPC run starts the real cache
service (memory store), fills one partition with 100k entries, and times Lookup RPCs on
127.0.0.1: semantic misses (exact check + embed + search + guards) and exact hits; then the
same against the Redis store (a private redis-server) with 20k entries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from services.cache import guards
from services.cache.app import CacheApp
from services.cache.embedder import LocalEmbedder
from services.cache.index import AnnParams, VectorIndex
from services.cache.keys import ChatRequest, Message, Params, ScopeId
from services.cache.store.base import KIND_ANSWER, Entry
from services.cache.store.memory import MemoryStore
from services.cache.store.redis import RedisStore
from services.testing import start_suite
from tests.support.backends import private_redis
from tests.unit.cache.helpers import lookup, store

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
REDIS_ENTRIES = 20_000
DIM = 384
QUERIES = [
    "How do I reset my password?",
    "What are your opening hours on public holidays?",
    "Can I change the delivery address after ordering?",
    "Why was my card declined when paying for the annual plan?",
    "How do I export all my invoices as a single PDF file?",
    "Is there a student discount for the Pro subscription?",
    "What is the difference between the Team and Enterprise plans in terms of support?",
    "My package says delivered but I never received it, what should I do now?",
]


def _random_unit(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = rng.standard_normal((n, DIM), dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def _pct(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(ordered[len(ordered) // 2] * 1000, 3),
        "p95_ms": round(ordered[int(len(ordered) * 0.95) - 1] * 1000, 3),
        "n": len(ordered),
    }


def build_index(n: int, rng: np.random.Generator, params: AnnParams) -> tuple[VectorIndex, float]:
    rows = _random_unit(rng, n)
    started = time.perf_counter()
    index = VectorIndex.from_rows(np.arange(1, n + 1, dtype=np.int64), rows, params)
    return index, time.perf_counter() - started


def time_search(index: VectorIndex, queries: np.ndarray, k: int) -> dict[str, float]:
    samples = []
    for q in queries:
        started = time.perf_counter()
        index.search(q, k)
        samples.append(time.perf_counter() - started)
    return _pct(samples)


def time_embed_search(index: VectorIndex, embedder: LocalEmbedder, k: int, rounds: int) -> dict[str, float]:
    model = embedder.model()
    samples = []
    for i in range(rounds):
        text = QUERIES[i % len(QUERIES)] + f" ({i})"
        started = time.perf_counter()
        index.search(model.encode([text])[0], k)
        samples.append(time.perf_counter() - started)
    return _pct(samples)


def time_embed(embedder: LocalEmbedder, rounds: int) -> dict[str, float]:
    model = embedder.model()
    samples = []
    for i in range(rounds):
        started = time.perf_counter()
        model.encode([QUERIES[i % len(QUERIES)] + f" ({i})"])
        samples.append(time.perf_counter() - started)
    return _pct(samples)


def time_verification(rounds: int) -> dict[str, float]:
    """The guards and verification step on one candidate, uncached: what a lookup pays per
    candidate above the threshold (a miss below it pays nothing)."""
    pairs = [(q, f"{q} please") for q in QUERIES] + [(q, q.replace("my", "the")) for q in QUERIES]
    samples = []
    for i in range(rounds):
        query, cached = pairs[i % len(pairs)]
        guards.features.cache_clear()
        started = time.perf_counter()
        guards.check(f"{query} ({i})", cached)
        samples.append(time.perf_counter() - started)
    return _pct(samples)


def _time_stages(app: CacheApp) -> dict[str, list[float]]:
    """Times the engine's stages of each Lookup from here on (wrapping the app's objects)."""
    samples: dict[str, list[float]] = {}

    def timed(owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)
        samples[label] = []

        if asyncio.iscoroutinefunction(inner):

            async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return await inner(*args, **kwargs)
                finally:
                    samples[label].append(time.perf_counter() - started)

            setattr(owner, name, wrapped_async)
        else:

            def wrapped(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return inner(*args, **kwargs)
                finally:
                    samples[label].append(time.perf_counter() - started)

            setattr(owner, name, wrapped)

    timed(app.engine, "lookup", "engine (all stages)")
    timed(app.engine, "keys", "keys")
    timed(app.store, "get", "store.get")
    timed(app.engine, "_embed", "embed")
    timed(app.store, "search", "search")
    timed(guards, "check", "guards (per candidate above threshold)")
    return samples


async def grpc_lookup(
    n: int, rounds: int, rng: np.random.Generator, store_url: str = "memory://"
) -> dict[str, Any]:
    environ = dict(os.environ)
    environ.update(
        {
            "BALLAST_CACHE_STORE": store_url,
            "BALLAST_CACHE_FILE": "/nonexistent.yaml",
            "BALLAST_CACHE_ANN_THRESHOLD": str(n + 1),  # fill exact, then build once below
            "BALLAST_CACHE_MAX_BYTES": str(4 * 1024**3),
            "BALLAST_CACHE_MAX_TENANT_BYTES": "0",  # one tenant holds every entry here
            "BALLAST_LOG_LEVEL": "warning",
        }
    )
    suite = await start_suite(["cache"], environ)
    try:
        app = suite.running["cache"].app
        assert isinstance(app, CacheApp) and isinstance(app.store, MemoryStore | RedisStore)
        await app.embedder.embed(["warm up"])  # the model loads in the background at start
        probe = lookup(QUERIES[0])
        chat = ChatRequest(
            scope=ScopeId("t1", "", "default"),
            model=probe.model,
            messages=tuple(
                Message(r, m.content) for r, m in zip(("system", "user"), probe.messages, strict=True)
            ),
            params=Params(),
        )
        partition = app.engine.keys(chat).partition
        rows = _random_unit(rng, n)
        now = time.time()
        started = time.perf_counter()
        for i in range(n):
            await app.store.put(
                Entry(
                    id=uuid.uuid4().hex,
                    kind=KIND_ANSWER,
                    tenant_id="t1",
                    namespace="default",
                    key=f"bench-{i}",
                    payload=b"\x12\x00",
                    created_at=now,
                    expires_at=now + 86400,
                    partition=partition,
                    text=f"filler question {i}",
                    vector=rows[i],
                ),
                now,
            )
        fill = time.perf_counter() - started
        index = app.store.indexes.index(partition)
        assert index is not None and len(index) == n
        started = time.perf_counter()
        # Two build threads keep the run short; the searches do not depend on it.
        index.params = replace(index.params, threshold=20_000, threads=2)
        index.build_now()
        build = time.perf_counter() - started
        # A few real entries: exact hits are timed on these.
        for q in QUERIES:
            await suite.cache.Store(store(q, "An answer."))
        stages = _time_stages(app)
        semantic, exact = [], []
        for i in range(rounds):
            request = lookup(QUERIES[i % len(QUERIES)] + f" variant {i}")
            t0 = time.perf_counter()
            await suite.cache.Lookup(request)
            semantic.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            reply = await suite.cache.Lookup(lookup(QUERIES[i % len(QUERIES)]))
            exact.append(time.perf_counter() - t0)
            assert reply.hit
        stages.pop("store.get")  # exact hits as well: not one semantic lookup's share
        return {
            "stages": {name: _pct(samples) for name, samples in stages.items() if samples},
            "entries": n,
            "fill_seconds": round(fill, 1),
            "hnsw_build_seconds": round(build, 1),
            "semantic_lookup": _pct(semantic),
            "exact_hit": _pct(exact),
        }
    finally:
        await suite.stop()


def _export(ref: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    (into / "tree").mkdir()
    subprocess.run(["tar", "-x", "-C", str(into / "tree")], input=archive, check=True)
    return into / "tree"


def _run_grpc_in(tree: Path, output: Path) -> dict[str, Any]:
    """This file's gRPC measurement in its own process, importing the services of `tree`."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "BALLAST_"))},
        "PYTHONPATH": os.pathsep.join([str(tree), str(tree / "gen")]),
    }
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--grpc-only", str(output)],
        cwd=tree,
        env=env,
        check=True,
    )
    result: dict[str, Any] = json.loads(output.read_text())
    return result


def compare(baseline: str, rounds: int) -> None:
    runs: dict[str, list[dict[str, Any]]] = {}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="cache_lookup-") as tmp:
        trees = [(f"baseline ({baseline})", _export(baseline, Path(tmp))), ("this tree", ROOT)]
        for round_number in range(rounds):
            for name, tree in trees:
                row = _run_grpc_in(tree, Path(tmp) / f"run-{round_number}.json")
                print(name, row, flush=True)
                runs.setdefault(name, []).append(row)
                loads.append(os.getloadavg()[0])
    measures = [("semantic_lookup", "gRPC semantic Lookup"), ("exact_hit", "gRPC exact hit")]
    stage_names = list(runs["this tree"][0]["stages"])
    md = [
        "# Cache lookup latency, this tree against a baseline (bench/cache_lookup.py --baseline)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"memory store, {runs['this tree'][0]['entries']:,} entries in one partition (HNSW), "
        f"{runs['this tree'][0]['semantic_lookup']['n']} lookups of each kind per run; {rounds} rounds, "
        f"variants alternating, each in its own process; load average {min(loads):.1f}-{max(loads):.1f}. "
        "Cells: run by run, p50 / p95 in ms. Stages are timed inside the service (the semantic "
        "lookups only); gRPC adds the client, the wire on 127.0.0.1 and the servicer.",
        "",
        f"Command: `.venv/bin/python -m bench.cache_lookup {' '.join(sys.argv[1:])}`",
        "",
        "| measure | " + " | ".join(runs) + " |",
        "|---|" + "---|" * len(runs),
    ]

    def cell(rows: list[dict[str, Any]], pick: Any) -> str:
        return "; ".join(f"{pick(r)['p50_ms']:.2f} / {pick(r)['p95_ms']:.2f}" for r in rows)

    for key, title in measures:
        md.append(
            f"| {title} | " + " | ".join(cell(rows, lambda r, k=key: r[k]) for rows in runs.values()) + " |"
        )
    for stage in stage_names:
        md.append(
            f"| stage: {stage} | "
            + " | ".join(
                cell(rows, lambda r, s=stage: r["stages"].get(s, {"p50_ms": math.nan, "p95_ms": math.nan}))
                for rows in runs.values()
            )
            + " |"
        )
    medians = {
        name: {key: statistics.median(r[key]["p95_ms"] for r in rows) for key, _ in measures}
        for name, rows in runs.items()
    }
    md += [
        "",
        "Median over rounds of the p95 (ms): "
        + "; ".join(
            f"{name}: semantic {m['semantic_lookup']:.2f}, exact {m['exact_hit']:.2f}"
            for name, m in medians.items()
        ),
        "",
    ]
    text = "\n".join(md)
    print(text)
    (RESULTS / "cache_lookup_ab.md").write_text(text)
    report = {"load_average": [round(x, 2) for x in loads], "runs": runs}
    (RESULTS / "cache_lookup_ab.json").write_text(json.dumps(report, indent=2) + "\n")


def cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="skip the 1M-entry index")
    parser.add_argument("--baseline", default="", help="git ref: time only the gRPC Lookup, against it")
    parser.add_argument("--rounds", type=int, default=2, help="with --baseline: runs of each, alternating")
    parser.add_argument("--grpc-only", default="", help=argparse.SUPPRESS)  # one --baseline run: JSON path
    args = parser.parse_args()
    if args.grpc_only:
        grpc_only = asyncio.run(grpc_lookup(100_000, 300, np.random.default_rng(7)))
        Path(args.grpc_only).write_text(json.dumps(grpc_only))
    elif args.baseline:
        compare(args.baseline, args.rounds)
    else:
        asyncio.run(main(quick=args.quick))


async def main(*, quick: bool) -> None:
    rng = np.random.default_rng(7)
    sizes = (10_000, 100_000) if quick else (10_000, 100_000, 1_000_000)
    # Background builds in the service use one thread; the benchmark builds with two to stay short.
    params = AnnParams(threads=2)
    embedder = LocalEmbedder(preload=False)
    load_started = time.perf_counter()
    embedder.model()
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "model_load_seconds": round(time.perf_counter() - load_started, 3),
        "embed_alone": time_embed(embedder, 300),
        "verification_per_candidate": time_verification(2000),
        "ann": {
            "threshold": params.threshold,
            "m": params.m,
            "ef_construction": params.ef_construction,
            "ef": params.ef,
        },
        "index": [],
    }
    queries = _random_unit(rng, 2000)
    for n in sizes:
        index, build = build_index(n, rng, params)
        row = {
            "entries": n,
            "kind": "hnsw" if index.approximate else "exact",
            "build_seconds": round(build, 1),
            "search": time_search(index, queries, 4),
            "embed_and_search": time_embed_search(index, embedder, 4, 300),
        }
        report["index"].append(row)
        print(row, flush=True)
        del index
    report["grpc"] = await grpc_lookup(100_000, 300, rng)
    print(report["grpc"], flush=True)
    # The same with the Redis store (a private redis-server, so the shared one stays clean).
    with private_redis() as server:
        report["grpc_redis"] = await grpc_lookup(REDIS_ENTRIES, 300, rng, server.url)
    print(report["grpc_redis"], flush=True)

    md = [
        "# Cache lookup latency (bench/cache_lookup.py)",
        "",
        f"Machine: {report['machine']} (shared with other work while measuring). "
        f"Embedder: local MiniLM int8, loaded in {report['model_load_seconds']} s; one query embeds in "
        f"{report['embed_alone']['p50_ms']} ms p50 / {report['embed_alone']['p95_ms']} ms p95. "
        f"Guards and verification of one candidate (uncached): "
        f"{report['verification_per_candidate']['p50_ms']} ms p50 / "
        f"{report['verification_per_candidate']['p95_ms']} ms p95 (run only on candidates above the threshold). "
        f"HNSW: M={params.m}, ef_construction={params.ef_construction}, ef={params.ef}; exact below "
        f"{params.threshold} entries. Random normalised 384-d vectors, top-4.",
        "",
        "| entries | index | search p50 | search p95 | embed+search p50 | embed+search p95 | build |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["index"]:
        s, e = row["search"], row["embed_and_search"]
        md.append(
            f"| {row['entries']:,} | {row['kind']} | {s['p50_ms']} ms | {s['p95_ms']} ms | {e['p50_ms']} ms | "
            f"{e['p95_ms']} ms | {row['build_seconds']} s |"
        )
    g = report["grpc"]
    md += [
        "",
        f"Whole gRPC Lookup on 127.0.0.1 with {g['entries']:,} entries in the partition "
        f"(HNSW built in {g['hnsw_build_seconds']} s):",
        "",
        "| call | p50 | p95 | n |",
        "|---|---|---|---|",
        f"| semantic lookup (exact miss, embed, search, guards) | {g['semantic_lookup']['p50_ms']} ms | "
        f"{g['semantic_lookup']['p95_ms']} ms | {g['semantic_lookup']['n']} |",
        f"| exact hit | {g['exact_hit']['p50_ms']} ms | {g['exact_hit']['p95_ms']} ms | {g['exact_hit']['n']} |",
        "",
        "Where a semantic lookup's time goes, timed inside the service:",
        "",
        "| stage | p50 | p95 | n |",
        "|---|---|---|---|",
        *(
            f"| {stage} | {t['p50_ms']} ms | {t['p95_ms']} ms | {t['n']} |"
            for stage, t in g["stages"].items()
            if t["n"]
        ),
        "",
    ]
    r = report["grpc_redis"]
    md += [
        f"The same with the Redis store (private redis-server on 127.0.0.1, {r['entries']:,} entries):",
        "",
        "| call | p50 | p95 | n |",
        "|---|---|---|---|",
        f"| semantic lookup | {r['semantic_lookup']['p50_ms']} ms | {r['semantic_lookup']['p95_ms']} ms | "
        f"{r['semantic_lookup']['n']} |",
        f"| exact hit | {r['exact_hit']['p50_ms']} ms | {r['exact_hit']['p95_ms']} ms | {r['exact_hit']['n']} |",
        "",
    ]
    text = "\n".join(md)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    name = "cache_lookup_quick" if quick else "cache_lookup"
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    cli()
