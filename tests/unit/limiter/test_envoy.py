"""Envoy's RateLimitService on the limiter's port, with envoyproxy/ratelimit config files."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import yaml
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import wrappers_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.limiter.envoy_config import EnvoyConfigError, parse_envoy_config
from services.testing import Suite
from tests.conftest import SuiteFactory

OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT

API = """
domain: api
descriptors:
  - key: remote_address
    rate_limit: { unit: minute, requests_per_unit: 3 }
  - key: path
    value: /admin*
    rate_limit: { unit: hour, requests_per_unit: 2, name: admin }
  - key: path
    value: /shadow
    shadow_mode: true
    rate_limit: { unit: second, requests_per_unit: 1 }
  - key: path
    value: /free
    rate_limit: { unlimited: true }
  - key: plan
    value: gold
    descriptors:
      - key: user
        detailed_metric: true
        rate_limit: { unit: day, requests_per_unit: 5, replaces: [{ name: admin }] }
"""
OTHER = """
domain: other
descriptors:
  - key: k
    rate_limit: { unit: second, requests_per_unit: 100 }
"""


def parse(text: str) -> object:
    return parse_envoy_config([("test.yaml", yaml.safe_load(text))])


def test_lookup_follows_envoyproxy_ratelimit() -> None:
    config = parse_envoy_config([("api.yaml", yaml.safe_load(API))])
    by_value = config.find("api", [("remote_address", "10.0.0.1")])
    assert by_value is not None and by_value.limit.requests_per_unit == 3
    wildcard = config.find("api", [("path", "/admin/users")])
    assert wildcard is not None and wildcard.limit.name == "admin"
    nested = config.find("api", [("plan", "gold"), ("user", "ann")])
    assert nested is not None and nested.limit.full_key == "api.plan_gold.user"
    assert nested.limit.replaces == ("admin",) and nested.stats_key == "api.plan_gold.user_ann"
    assert config.find("api", [("plan", "gold")]) is None  # no limit at that depth
    assert config.find("api", [("remote_address", "x"), ("extra", "y")]) is None  # deeper than the config
    assert config.find("api", [("path", "/other")]) is None
    assert config.find("nope", [("remote_address", "x")]) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "domain: d\ndescriptors: [{key: k, rate_limit: {unit: fortnight, requests_per_unit: 1}}]",
            "invalid rate limit unit",
        ),
        ("domain: d\ndescriptors: [{key: k, rate_limit: {unlimited: true, unit: second}}]", "unlimited"),
        (
            "domain: d\ndescriptors: [{key: '', rate_limit: {unit: second, requests_per_unit: 1}}]",
            "empty key",
        ),
        ("domain: d\ndescriptors: [{key: k, colour: red}]", "unknown key 'colour'"),
        ("domain: d\ndescriptors: [{key: k}, {key: k}]", "duplicate descriptor composite key 'd.k'"),
        ("descriptors: [{key: k}]", "empty domain"),
        (
            "domain: d\ndescriptors: [{key: k, rate_limit: {unit: second, requests_per_unit: 1, name: a, replaces: [{name: a}]}}]",
            "replaces should not contain name of same descriptor",
        ),
        (
            "domain: d\ndescriptors: [{key: k, rate_limit: {unit: second, requests_per_unit: -2}}]",
            "requests_per_unit",
        ),
    ],
)
def test_bad_config_is_refused_naming_the_file(text: str, message: str) -> None:
    with pytest.raises(EnvoyConfigError) as info:
        parse(text)
    assert message in str(info.value) and "test.yaml" in str(info.value)


def test_a_domain_may_appear_in_one_file_only() -> None:
    with pytest.raises(EnvoyConfigError, match="duplicate domain 'other'"):
        parse_envoy_config([("a.yaml", yaml.safe_load(OTHER)), ("b.yaml", yaml.safe_load(OTHER))])


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "ratelimit"
    folder.mkdir()
    (folder / "api.yaml").write_text(API)
    (folder / "other.yml").write_text(OTHER)
    (folder / "README.txt").write_text("not a config file")
    return folder


@pytest.fixture(params=["memory", "redis"])
async def envoy(
    request: pytest.FixtureRequest, suite_factory: SuiteFactory, config_dir: Path
) -> AsyncIterator[Suite]:
    store = "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")
    suite = await suite_factory(
        ["limiter"],
        {
            "BALLAST_LIMITER_STORE": store,
            "BALLAST_LIMITER_ENVOY_CONFIG": str(config_dir),
            "BALLAST_LIMITER_RELOAD_INTERVAL": "50ms",
            # Behaviour with Redis, not outages: no fail-mode decision on a busy machine.
            "BALLAST_LIMITER_STORE_TIMEOUT": "60s",
        },
    )
    yield suite


def stub(suite: Suite) -> rls_pb2_grpc.RateLimitServiceStub:
    return rls_pb2_grpc.RateLimitServiceStub(suite.channel("limiter"))


def descriptor(*entries: tuple[str, str], hits: int | None = None) -> ratelimit_pb2.RateLimitDescriptor:
    d = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )
    if hits is not None:
        d.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits))
    return d


async def ask(
    suite: Suite, *descriptors: ratelimit_pb2.RateLimitDescriptor, domain: str = "api", hits: int = 0
) -> rls_pb2.RateLimitResponse:
    request = rls_pb2.RateLimitRequest(domain=domain, descriptors=list(descriptors), hits_addend=hits)
    response: rls_pb2.RateLimitResponse = await stub(suite).ShouldRateLimit(request)
    return response


async def test_envoy_client_gets_ok_then_over_limit_as_configured(envoy: Suite) -> None:
    codes = [(await ask(envoy, descriptor(("remote_address", "10.0.0.1")))).overall_code for _ in range(4)]
    assert codes == [OK, OK, OK, OVER]
    over = await ask(envoy, descriptor(("remote_address", "10.0.0.1")))
    status = over.statuses[0]
    assert status.code == OVER and status.limit_remaining == 0
    assert status.current_limit.requests_per_unit == 3
    assert status.current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.MINUTE
    assert 0 < status.duration_until_reset.ToNanoseconds() <= 60e9  # to the minute's end
    # each value of a key-only descriptor has its own counter
    fresh = await ask(envoy, descriptor(("remote_address", "10.0.0.2")))
    assert fresh.overall_code == OK and fresh.statuses[0].limit_remaining == 2


async def test_unconfigured_domains_and_descriptors_are_ok(envoy: Suite) -> None:
    for _ in range(3):
        unknown_domain = await ask(envoy, descriptor(("remote_address", "x")), domain="nobody")
        assert unknown_domain.overall_code == OK and unknown_domain.statuses[0].code == OK
        unknown = await ask(envoy, descriptor(("path", "/elsewhere")))
        assert unknown.overall_code == OK and not unknown.statuses[0].HasField("current_limit")


async def test_unlimited_and_shadow_mode(envoy: Suite) -> None:
    for _ in range(5):
        free = await ask(envoy, descriptor(("path", "/free")))
        assert free.overall_code == OK and free.statuses[0].limit_remaining == 2**32 - 1
    shadow = [await ask(envoy, descriptor(("path", "/shadow"))) for _ in range(3)]
    assert all(r.overall_code == OK for r in shadow)
    assert shadow[-1].statuses[0].limit_remaining == 0  # counted as if enforcing


async def test_each_descriptor_is_counted_on_its_own_with_its_own_hits(envoy: Suite) -> None:
    # As upstream: a descriptor over its limit refuses the request, and every descriptor is
    # still counted (upstream increments, then compares).
    refused = await ask(
        envoy, descriptor(("remote_address", "a"), hits=1), descriptor(("path", "/admin/x"), hits=3)
    )
    assert refused.overall_code == OVER
    assert [s.code for s in refused.statuses] == [OK, OVER]
    assert [s.limit_remaining for s in refused.statuses] == [2, 0]
    both = await ask(envoy, descriptor(("remote_address", "a")), descriptor(("path", "/admin/x")), hits=2)
    # the request's hits_addend (2) applied to each: 1 + 2 of 3, and 3 + 2 of 2
    assert [s.code for s in both.statuses] == [OK, OVER]
    assert [s.limit_remaining for s in both.statuses] == [0, 0]


async def test_replaces_drops_the_named_limit(envoy: Suite) -> None:
    for _ in range(4):
        response = await ask(
            envoy, descriptor(("path", "/admin/y")), descriptor(("plan", "gold"), ("user", "ann"))
        )
        assert response.overall_code == OK
        assert response.statuses[0].code == OK and not response.statuses[0].HasField("current_limit")
    assert response.statuses[1].limit_remaining == 1


async def test_config_reloads_and_bad_requests_are_invalid_argument(envoy: Suite, config_dir: Path) -> None:
    assert (await ask(envoy, descriptor(("k", "v")), domain="other")).statuses[
        0
    ].current_limit.requests_per_unit == 100
    rewrite(config_dir / "other.yml", OTHER.replace("100", "7"))
    for _ in range(100):
        response = await ask(envoy, descriptor(("k", "v")), domain="other")
        if response.statuses[0].current_limit.requests_per_unit == 7:
            break
        await asyncio.sleep(0.05)
    assert response.statuses[0].current_limit.requests_per_unit == 7
    bad = [
        rls_pb2.RateLimitRequest(domain="api"),
        rls_pb2.RateLimitRequest(descriptors=[descriptor(("a", "b"))]),
        rls_pb2.RateLimitRequest(domain="api", descriptors=[ratelimit_pb2.RateLimitDescriptor()]),
        rls_pb2.RateLimitRequest(domain="api", descriptors=[descriptor(("", "b"))]),
    ]
    for request in bad:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(envoy).ShouldRateLimit(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def rewrite(path: Path, text: str) -> None:
    path.write_text(text)
    os.utime(path, ns=(1, 10**18))


async def test_reflection_lists_the_envoy_service(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(["limiter"])
    reflection = reflection_pb2_grpc.ServerReflectionStub(suite.channel("limiter"))

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for reply in reflection.ServerReflectionInfo(requests()):
        names = {s.name for s in reply.list_services_response.service}
        break
    assert "envoy.service.ratelimit.v3.RateLimitService" in names
    # without a config file every descriptor is unconfigured: OK
    assert (await ask(suite, descriptor(("remote_address", "x")))).overall_code == OK
