"""Limiter decisions per second and latency, beside a no-op gRPC call on the same server.

    .venv/bin/python -m bench.limiter_throughput [--seconds 2] [--rounds 4] [--concurrency 1,16,64]
        [--stores memory,redis,cluster]

Stores: `memory`; `redis` (one private redis-server, through redis-py's asyncio client);
`cluster` (a private three-primary Redis Cluster, each primary with a replica, through
redis-py's cluster client).
Each store's limiter runs as its own process (`python -m services.limiter`, as in production),
all started up front, and this process is the client. The stores are measured alternately:
every round measures each store in turn, so load from elsewhere on the machine hits them alike.
At each concurrency it measures, for `--seconds` each:
  noop     grpc.health.v1.Health/Check on the limiter's port (the baseline: gRPC alone)
  rpc-noop LimiterService/ReportHeadroom carrying no figures: a limiter RPC that decides nothing,
           so it shows what the kit's interceptors (tracing, metrics, error mapping) cost
  check-1  Check with requests=1 (one limit: the sliding window)
  check-3  Check with requests=1 and reserve_tokens (three limits: window, user and tenant budgets)
and prints decisions/s, p50/p99 latency and the ratio to the no-op call's throughput. For
Redis it then counts round trips per decision from INFO commandstats (after CONFIG RESETSTAT,
summed over a cluster's primaries): commands the limiter sent (EVALSHA and anything else not
issued from inside the script).
Results go to bench/results/limiter_throughput.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis
from ballast.common.v1 import common_pb2
from ballast.limiter.v1 import limiter_pb2, limiter_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.backends import free_port, private_redis, private_redis_cluster

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TIERS = """
tiers:
  bench:
    priority: normal
    requests: { limit: 1000000000, window: 1h }
    user_tokens_per_day: { limit: 1000000000000 }
    tenant_tokens_per_day: { limit: 1000000000000 }
    session_tool_calls: { limit: 1000000 }
"""
# Commands the limiter's Lua scripts issue from inside Redis (not round trips).
SCRIPT_INTERNAL = {
    "hgetall", "hdel", "hincrby", "pexpire", "hmget", "hset", "hget", "zrangebyscore",
    "zremrangebyscore", "zrange", "zadd", "zrem", "get", "set", "pttl", "incrby", "time",
}  # fmt: skip
USERS = 1000


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _measure(
    call: Callable[[], Awaitable[Any]], seconds: float, concurrency: int
) -> tuple[list[float], float]:
    """Latencies (ms) of every call made by `concurrency` workers for `seconds`, and the time taken."""
    latencies: list[float] = []
    stop_at = 0.0

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - started) * 1000)

    stop_at = time.perf_counter() + 0.1  # warm up the connections
    await asyncio.gather(*(worker() for _ in range(min(concurrency, 4))))
    latencies.clear()
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


def _summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies),
        "p99_ms": _percentile(latencies, 0.99),
        "calls": len(latencies),
    }


def _spawn(store_url: str, tiers: Path, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "BALLAST_LIMITER_PORT": str(port),
        "BALLAST_LIMITER_STORE": store_url,
        "BALLAST_LIMITER_TIERS_FILE": str(tiers),
        # Round trips are counted per decision: keep the 1 s headroom poll out of the count.
        "BALLAST_LIMITER_HEADROOM_REFRESH": "1h",
        "BALLAST_LIMITER_STORE_TIMEOUT": "2s",
        "BALLAST_METRICS": "false",
        "OTEL_SDK_DISABLED": "true",
        "BALLAST_LOG_LEVEL": "warning",
    }
    return subprocess.Popen([sys.executable, "-m", "services.limiter"], cwd=ROOT, env=env)


async def _wait_serving(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for _ in range(300):
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError("the limiter did not start")


def _check(limits: int) -> Callable[[limiter_pb2_grpc.LimiterServiceAsyncStub], Callable[[], Awaitable[Any]]]:
    # One request per user, built up front: the client's own work per call stays as small as
    # the no-op call's (it shares the machine's two cores with the limiter and Redis).
    requests = [
        limiter_pb2.CheckRequest(
            caller=common_pb2.Caller(tenant_id=f"t{user % 10}", user_id=f"u{user}", tier="bench"),
            requests=1,
            reserve_tokens=100 if limits == 3 else 0,
        )
        for user in range(USERS)
    ]

    def bind(stub: limiter_pb2_grpc.LimiterServiceAsyncStub) -> Callable[[], Awaitable[Any]]:
        async def call() -> None:
            response = await stub.Check(requests[random.randrange(USERS)])
            if response.decision != limiter_pb2.DECISION_ALLOW or response.degraded:
                raise RuntimeError(f"unexpected decision (or the store was unreachable): {response}")

        return call

    return bind


async def _round_trips(nodes: list[str], stub: limiter_pb2_grpc.LimiterServiceAsyncStub) -> dict[str, Any]:
    """Commands per decision, summed over `nodes` (one server, or a cluster's primaries)."""
    clients = [aioredis.from_url(url) for url in nodes]
    out: dict[str, Any] = {}
    try:
        for limits in (1, 3):
            call = _check(limits)(stub)
            for _ in range(20):
                await call()  # the script is loaded (on every shard its users reach) before counting
            for client in clients:
                await client.config_resetstat()
            decisions = 200
            for _ in range(decisions):
                await call()
            calls: dict[str, int] = {}
            for client in clients:
                stats = await client.info("commandstats")
                for k, v in stats.items():
                    name = k.removeprefix("cmdstat_")
                    calls[name] = calls.get(name, 0) + int(v["calls"])
            calls.pop("info", None)
            calls.pop("config|resetstat", None)
            evalsha = calls.get("evalsha", 0)
            client_sent = sum(n for cmd, n in calls.items() if cmd.split("|")[0] not in SCRIPT_INTERNAL)
            out[f"check-{limits}"] = {
                "decisions": decisions,
                "evalsha_per_decision": evalsha / decisions,
                "round_trips_per_decision": client_sent / decisions,
                "commands_inside_script_per_decision": (sum(calls.values()) - client_sent) / decisions,
            }
    finally:
        for client in clients:
            await client.aclose()
    return out


async def _bench(
    targets: list[tuple[str, str, list[str]]],
    seconds: float,
    concurrencies: list[int],
    tiers: Path,
    rounds: int,
) -> list[dict[str, Any]]:
    """targets: (store name, store URL, Redis nodes to count round trips on). Alternating."""
    procs = []
    channels = []
    results: list[dict[str, Any]] = [{"store": name, "rows": []} for name, _, _ in targets]
    try:
        cells: list[dict[str, Callable[[], Awaitable[Any]]]] = []
        limiters = []
        for _, url, _ in targets:
            port = free_port()
            procs.append(_spawn(url, tiers, port))
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            channels.append(channel)
            await _wait_serving(channel)
            health = health_pb2_grpc.HealthStub(channel)
            limiter = limiter_pb2_grpc.LimiterServiceStub(channel)
            limiters.append(limiter)
            cells.append(_calls(health, limiter))
        for concurrency in concurrencies:
            # Interleaved short rounds, so load from elsewhere on the machine hits every store and
            # every call alike.
            samples: list[dict[str, tuple[list[float], float]]] = [
                {name: ([], 0.0) for name in calls} for calls in cells
            ]
            for _ in range(rounds):
                for t, calls in enumerate(cells):
                    for name, call in calls.items():
                        lat, elapsed = await _measure(call, seconds / rounds, concurrency)
                        old: tuple[list[float], float] = samples[t][name]
                        samples[t][name] = (old[0] + lat, old[1] + elapsed)
            for t, (store, _, _) in enumerate(targets):
                base = _summary(*samples[t]["noop"])
                for name in cells[t]:
                    m = _summary(*samples[t][name])
                    row = {
                        "store": store,
                        "call": name,
                        "concurrency": concurrency,
                        **m,
                        "ratio": m["rps"] / base["rps"],
                    }
                    results[t]["rows"].append(row)
                    _print_row(row)
        for t, (_, _, nodes) in enumerate(targets):
            if nodes:
                results[t]["round_trips"] = await _round_trips(nodes, limiters[t])
    finally:
        for channel in channels:
            await channel.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            await asyncio.to_thread(proc.wait, 10)
    return results


def _calls(
    health: health_pb2_grpc.HealthStub, limiter: limiter_pb2_grpc.LimiterServiceAsyncStub
) -> dict[str, Callable[[], Awaitable[Any]]]:
    health_request = health_pb2.HealthCheckRequest()
    headroom_request = limiter_pb2.ReportHeadroomRequest(
        provider="bench", remaining_requests=-1, remaining_tokens=-1, limit_requests=-1, limit_tokens=-1
    )

    async def noop() -> None:
        await health.Check(health_request)

    async def rpc_noop() -> None:
        await limiter.ReportHeadroom(headroom_request)

    return {"noop": noop, "rpc-noop": rpc_noop, "check-1": _check(1)(limiter), "check-3": _check(3)(limiter)}


def _print_row(row: dict[str, Any]) -> None:
    print(
        f"{row['store']:<9} {row['call']:<8} c={row['concurrency']:<3} {row['rps']:>9.0f}/s "
        f"p50 {row['p50_ms']:>7.2f} ms  p99 {row['p99_ms']:>7.2f} ms  x{row['ratio']:.2f} of noop",
        flush=True,
    )


def _markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Limiter throughput",
        "",
        f"Machine: {meta['machine']}, {meta['cpus']} CPUs (load average {meta['load']} at start, shared"
        " with other work), Python "
        f"{meta['python']}, redis-py {meta.get('redis_py', '?')}. Each store's limiter runs as its own process, this "
        "benchmark is the client; the stores are measured alternately (each round measures each in turn); "
        f"{meta['seconds']} s per cell, in {meta['rounds']} interleaved rounds. `noop` is grpc.health.v1.Health/Check on the same server; "
        "`rpc-noop` is a LimiterService call that decides nothing (the kit's interceptors: tracing, metrics, "
        "error mapping); `check-1`/`check-3` are Check decisions touching 1 and 3 limits.",
        "",
        "| store | call | concurrency | decisions/s | p50 ms | p99 ms | share of noop throughput |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for r in result["rows"]:
            lines.append(
                f"| {r['store']} | {r['call']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.2f} "
                f"| {r['p99_ms']:.2f} | {r['ratio']:.2f} |"
            )
    for result in results:
        trips = result.get("round_trips")
        if trips:
            lines += [
                "",
                f"{result['store']}: Redis round trips per decision (INFO commandstats, 200 sequential decisions each):",
                "",
                "| call | limits | EVALSHA / decision | round trips / decision | commands inside the script / decision |",
                "|---|---:|---:|---:|---:|",
            ]
            for call, t in trips.items():
                lines.append(
                    f"| {call} | {call[-1]} | {t['evalsha_per_decision']:.2f} | {t['round_trips_per_decision']:.2f} "
                    f"| {t['commands_inside_script_per_decision']:.1f} |"
                )
    return "\n".join(lines) + "\n"


async def _main(seconds: float, concurrencies: list[int], stores: list[str], rounds: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="ballast-limiter-bench-"))
    tiers = folder / "tiers.yaml"
    tiers.write_text(TIERS)
    meta = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "seconds": seconds,
        "rounds": rounds,
    }
    with contextlib.ExitStack() as stack:
        targets: list[tuple[str, str, list[str]]] = []
        for store in stores:
            if store == "memory":
                targets.append(("memory", "memory://", []))
            elif store == "redis":
                server = stack.enter_context(private_redis())
                targets.append((store, server.url, [server.url]))
            elif store == "cluster":
                cluster = stack.enter_context(private_redis_cluster(masters=3, replicas=1))
                primaries = [
                    f"redis://127.0.0.1:{n['port']}/0" for n in cluster.nodes() if n["role"] == "master"
                ]
                targets.append(("cluster", cluster.url, primaries))
            else:
                raise SystemExit(f"unknown store {store!r} (memory, redis, cluster)")
        meta["redis_py"] = importlib.metadata.version("redis")
        results = await _bench(targets, seconds, concurrencies, tiers, rounds)
    for result in results:
        for call, t in (result.get("round_trips") or {}).items():
            print(
                f"{result['store']} round trips per decision, {call}: {t['round_trips_per_decision']:.2f} "
                f"(EVALSHA {t['evalsha_per_decision']:.2f}; {t['commands_inside_script_per_decision']:.1f} commands inside the script)"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "limiter_throughput.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (RESULTS / "limiter_throughput.md").write_text(_markdown(results, meta))
    print(f"wrote {RESULTS / 'limiter_throughput.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--stores", default="memory,redis,cluster")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per cell")
    args = parser.parse_args()
    asyncio.run(
        _main(
            args.seconds,
            [int(c) for c in args.concurrency.split(",")],
            [s.strip() for s in args.stores.split(",") if s.strip()],
            args.rounds,
        )
    )


if __name__ == "__main__":
    main()
