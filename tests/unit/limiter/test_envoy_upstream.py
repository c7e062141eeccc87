"""Side by side: Ballast's Envoy API and a reference of upstream's semantics, same traffic and clock.

The limiter runs as a real in-process gRPC server with an injected clock (memory and Redis
stores); the reference (upstream_reference.py) is written from envoyproxy/ratelimit's
documentation. Every answer must be identical: overall code, and per descriptor the code,
limit_remaining, duration_until_reset and current limit; and the statistics in /metrics must
equal the reference's.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import yaml
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import wrappers_pb2

from services.kit.config import Env
from services.kit.server import start_service
from services.kit.telemetry import setup_telemetry
from services.limiter.app import LimiterApp
from services.limiter.config import LimiterSettings
from services.testing import Suite
from tests.unit.limiter.upstream_reference import UpstreamReference

OVER = rls_pb2.RateLimitResponse.OVER_LIMIT

CONFIG = """
domain: edge
descriptors:
  - key: ip
    rate_limit: { unit: second, requests_per_unit: 3 }
  - key: route
    value: /api*v1
    share_threshold: true
    rate_limit: { unit: minute, requests_per_unit: 7 }
  - key: route
    value: /img*
    rate_limit: { unit: minute, requests_per_unit: 2, name: images }
  - key: route
    value: /health
    rate_limit: { unlimited: true }
  - key: route
    value: /blocked
    rate_limit: { unit: hour, requests_per_unit: 0 }
  - key: user
    shadow_mode: true
    rate_limit: { unit: minute, requests_per_unit: 2 }
  - key: plan
    value: pro
    descriptors:
      - key: user
        rate_limit: { unit: second, requests_per_unit: 4, unit_multiplier: 5, replaces: [{ name: images }] }
  - key: tenant
    rate_limit: { unit: hour, requests_per_unit: 9 }
    descriptors:
      - key: model
        value: big
        rate_limit: { unit: minute, requests_per_unit: 5 }
"""

POOL: list[list[tuple[str, str]]] = [
    [("ip", "10.0.0.1")],
    [("ip", "10.0.0.2")],
    [("route", "/api/users/v1")],
    [("route", "/api/orders/v1")],
    [("route", "/img/a.png")],
    [("route", "/img/b.png")],
    [("route", "/health")],
    [("route", "/blocked")],
    [("route", "/elsewhere")],
    [("user", "ann")],
    [("plan", "pro"), ("user", "bob")],
    [("plan", "pro")],
    [("tenant", "acme")],
    [("tenant", "acme"), ("model", "big")],
    [("tenant", "acme"), ("model", "small")],
    [("unknown", "x")],
]


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.25  # a quarter second into a Unix second

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> AsyncIterator[Suite]:
    config = tmp_path / "edge.yaml"
    config.write_text(CONFIG)
    store = "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")
    environ = {
        "BALLAST_HOST": "127.0.0.1",
        "BALLAST_LIMITER_PORT": "0",
        "BALLAST_LIMITER_METRICS_PORT": "0",
        "OTEL_SDK_DISABLED": "true",
        "BALLAST_LIMITER_STORE": store,
        "BALLAST_LIMITER_ENVOY_CONFIG": str(config),
        # A busy machine must not turn a slow Redis answer into a fail-mode decision here.
        "BALLAST_LIMITER_STORE_TIMEOUT": "60s",
    }
    env = Env(environ)
    settings = LimiterSettings.from_env(env)
    env.check()
    running = await start_service(
        LimiterApp(settings, setup_telemetry("limiter", environ=environ), clock=clock)
    )
    suite = Suite({"limiter": running})
    yield suite
    await suite.stop(grace=0)  # nothing is asserted after the tests: no drain


def traffic(seed: int) -> list[tuple[float, list[tuple[list[tuple[str, str]], int | None]], int]]:
    """(seconds to advance, descriptors with their own hits or None, request hits_addend)."""
    rng = random.Random(seed)
    out = []
    for _ in range(400):
        step = rng.choice([0.0, 0.0, 0.0, 0.1, 0.37, 0.9, 1.0, 2.5, 7.0, 61.0])
        chosen = [
            (list(rng.choice(POOL)), rng.choice([None, None, None, 0, 1, 2, 5]))
            for _ in range(rng.randint(1, 3))
        ]
        out.append((step, chosen, rng.choice([0, 0, 1, 2, 3])))
    return out


def request_of(
    descriptors: list[tuple[list[tuple[str, str]], int | None]], hits_addend: int
) -> rls_pb2.RateLimitRequest:
    out = []
    for entries, hits in descriptors:
        d = ratelimit_pb2.RateLimitDescriptor(
            entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
        )
        if hits is not None:
            d.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits))
        out.append(d)
    return rls_pb2.RateLimitRequest(domain="edge", descriptors=out, hits_addend=hits_addend)


@pytest.mark.parametrize("seed", [1, 2])
async def test_answers_and_statistics_are_upstreams(limiter: Suite, clock: Clock, seed: int) -> None:
    reference = UpstreamReference(yaml.safe_load(CONFIG), clock)
    stub = rls_pb2_grpc.RateLimitServiceStub(limiter.channel("limiter"))
    overs = 0
    for n, (step, descriptors, hits_addend) in enumerate(traffic(seed)):
        clock.now += step
        response = await stub.ShouldRateLimit(request_of(descriptors, hits_addend))
        expected_over, expected = reference.should_rate_limit(descriptors, hits_addend)
        where = f"request {n} at {clock.now}: {descriptors} hits_addend={hits_addend}"
        assert (response.overall_code == OVER) == expected_over, where
        for status, want in zip(response.statuses, expected, strict=True):
            got_limit = status.current_limit.requests_per_unit if status.HasField("current_limit") else None
            got_reset = status.duration_until_reset.seconds if status.HasField("current_limit") else None
            assert (status.code == OVER, status.limit_remaining, got_reset, got_limit) == (
                want.over,
                want.remaining,
                want.reset_s,
                want.requests_per_unit,
            ), where
        overs += expected_over
    assert 20 < overs < 380  # the traffic exercised both answers

    metrics_port = limiter.running["limiter"].metrics_port
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    for stat, counts in reference.stats.items():
        exported: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(f"ratelimit_service_rate_limit_{stat}_total{{"):
                labels, _, value = line.rpartition(" ")
                domain = labels.split('domain="', 1)[1].split('"', 1)[0]
                key = labels.split('key="', 1)[1].split('"', 1)[0]
                exported[f"{domain}.{key}"] = float(value)
        assert exported == {k: float(v) for k, v in counts.items() if v}, stat
