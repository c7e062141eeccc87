"""The limiter on a real Redis Cluster (three primaries, each with a replica), four replicas.

Exact across replicas, one EVALSHA on one shard per decision (keys hashed per tenant), and
decisions continue, with nothing lost, after the shard's primary fails over to its replica.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis
from ballast.common.v1 import common_pb2
from ballast.limiter.v1 import limiter_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.support.backends import PrivateRedisCluster

TIERS = """
tiers:
  free:
    requests: { limit: 30, window: 1h }
    user_tokens_per_day: { limit: 1000000 }
    tenant_tokens_per_day: { limit: 100000000 }
"""
ENVOY = """
domain: cluster
descriptors:
  - key: client
    rate_limit: { unit: hour, requests_per_unit: 30 }
"""
REPLICAS = 4
# Commands a decision's script runs inside Redis (not round trips).
SCRIPT_INTERNAL = {
    "hgetall", "hdel", "hincrby", "pexpire", "hmget", "hset", "hget", "zrangebyscore",
    "zremrangebyscore", "zrange", "zadd", "zrem", "get", "set", "pttl", "incrby", "time",
}  # fmt: skip
# Commands redis-py's cluster client may send for itself (topology), not for a decision, and the
# replication traffic a replica sends its primary (REPLCONF ACK every second, PSYNC on reconnect).
HOUSEKEEPING = (
    "cluster",
    "command",
    "info",
    "config",
    "ping",
    "readonly",
    "client",
    "hello",
    "replconf",
    "psync",
    "sync",
)


@pytest.fixture
def cluster(redis_cluster: PrivateRedisCluster) -> PrivateRedisCluster:
    """The session's cluster (tests/conftest.py); the limiter's keys need no prefix here: the
    tenant and the Envoy domain are this module's own."""
    return redis_cluster


async def fleet(suite_factory: SuiteFactory, tmp_path: Path, cluster: PrivateRedisCluster) -> list[Suite]:
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text(TIERS)
    envoy = tmp_path / "cluster.yaml"
    envoy.write_text(ENVOY)
    environ = {
        "BALLAST_LIMITER_STORE": cluster.url,
        "BALLAST_LIMITER_TIERS_FILE": str(tiers),
        "BALLAST_LIMITER_ENVOY_CONFIG": str(envoy),
        "BALLAST_LIMITER_REPLICAS": str(REPLICAS),
        # Behaviour on a cluster, not outages: a slow answer on a busy machine must not be
        # decided by the fail mode.
        "BALLAST_LIMITER_STORE_TIMEOUT": "30s",
        "BALLAST_LIMITER_HEADROOM_REFRESH": "1h",
    }
    return [await suite_factory(["limiter"], environ) for _ in range(REPLICAS)]


def check(user: str, tenant: str = "t") -> limiter_pb2.CheckRequest:
    return limiter_pb2.CheckRequest(
        caller=common_pb2.Caller(tenant_id=tenant, user_id=user, tier="free"), requests=1, reserve_tokens=10
    )


async def admitted(suites: list[Suite], user: str, attempts: int = 60) -> list[limiter_pb2.CheckResponse]:
    responses = await asyncio.gather(
        *(suites[i % len(suites)].limiter.Check(check(user), timeout=60) for i in range(attempts))
    )
    return [r for r in responses if r.decision == limiter_pb2.DECISION_ALLOW]


def envoy_request(value: str) -> rls_pb2.RateLimitRequest:
    entry = ratelimit_pb2.RateLimitDescriptor.Entry(key="client", value=value)
    return rls_pb2.RateLimitRequest(
        domain="cluster", descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[entry])]
    )


async def test_exact_one_round_trip_on_one_shard_and_decisions_survive_a_failover(
    suite_factory: SuiteFactory, tmp_path: Path, cluster: PrivateRedisCluster
) -> None:
    suites = await fleet(suite_factory, tmp_path, cluster)

    allowed = await admitted(suites, "ann")
    assert len(allowed) == 30 and not any(r.degraded for r in allowed)
    stubs = [rls_pb2_grpc.RateLimitServiceStub(s.channel("limiter")) for s in suites]
    answers = await asyncio.gather(
        *(stubs[i % REPLICAS].ShouldRateLimit(envoy_request("c"), timeout=60) for i in range(60))
    )
    assert sum(a.overall_code == rls_pb2.RateLimitResponse.OK for a in answers) == 30

    # One round trip per decision, on the primary that owns the tenant's slot.
    clients = {p: redis.Redis(port=p) for p in cluster.ports}
    try:
        for client in clients.values():
            client.config_resetstat()
        decisions = 40
        for i in range(decisions):
            response = await suites[i % REPLICAS].limiter.Check(check(f"rt{i}"), timeout=60)
            assert response.decision == limiter_pb2.DECISION_ALLOW and not response.degraded
        # What clients sent to each primary (a replica applies the primary's writes, not ours).
        primaries = [int(n["port"]) for n in cluster.nodes() if n["role"] == "master"]
        sent: dict[int, dict[str, int]] = {}
        for port in primaries:
            calls = {
                k.removeprefix("cmdstat_"): int(v["calls"])
                for k, v in clients[port].info("commandstats").items()
            }
            sent[port] = {
                name: n
                for name, n in calls.items()
                if name.split("|")[0] not in HOUSEKEEPING and name.split("|")[0] not in SCRIPT_INTERNAL
            }
    finally:
        for client in clients.values():
            client.close()
    owner = cluster.master_of("{t:t}")
    assert sent[owner] == {"evalsha": decisions}
    assert all(not calls for port, calls in sent.items() if port != owner), sent  # the other shards: nothing

    # The tenant's primary fails over to its replica while decisions keep coming.
    stop = asyncio.Event()
    during: list[limiter_pb2.CheckResponse] = []

    async def traffic() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            during.append(await suites[n % REPLICAS].limiter.Check(check(f"d{n}"), timeout=60))

    load = asyncio.create_task(traffic())
    try:
        new_owner = await asyncio.to_thread(cluster.fail_over, owner)
    finally:
        stop.set()
        await load
    assert new_owner != owner and cluster.master_of("{t:t}") == new_owner
    assert during and all(r.decision == limiter_pb2.DECISION_ALLOW for r in during)

    # Nothing was lost: ann is still at her limit on every replica, decided by the new primary.
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        after = [await s.limiter.Check(check("ann"), timeout=60) for s in suites]
        if not any(r.degraded for r in after) or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert all(r.decision == limiter_pb2.DECISION_DENY and not r.degraded for r in after)
    # ...and a new user is exact across the four replicas on the new primary.
    fresh = await admitted(suites, "bob")
    assert len(fresh) == 30 and not any(r.degraded for r in fresh)
