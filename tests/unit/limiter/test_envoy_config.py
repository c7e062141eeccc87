"""envoyproxy/ratelimit's file format: every documented key loads and means what it means upstream.

The configs below are this project's own; between them they use every construct of upstream's
example files (nested key/value and key-only levels, a zero limit, unlimited, shadow mode,
free-form metadata, share_threshold on and off, value_to_metric, detailed_metric, wildcards at
the end, in the middle and several in one value, an explicit value beside a wildcard, the same
key at two levels, unit_multiplier, replaces).
"""

from __future__ import annotations

import pytest
import yaml

from services.limiter.envoy_config import EnvoyConfig, EnvoyConfigError, Match, parse_envoy_config

SHOP = """
domain: shop
descriptors:
  - key: origin
    value: edge
    descriptors:
      - key: backend
        value: catalog
        rate_limit: { unit: minute, requests_per_unit: 4 }
  - key: client
    rate_limit: { unit: minute, requests_per_unit: 6 }
    descriptors:
      - key: action
        rate_limit: { unit: hour, requests_per_unit: 7, name: actions }
      - key: action
        value: forbidden
        rate_limit: { unit: hour, requests_per_unit: 0 }
      - key: burst
        rate_limit: { unit: second, requests_per_unit: 2, unit_multiplier: 10 }
      - key: health
        rate_limit: { unlimited: true }
      - key: burst
        value: trial
        shadow_mode: true
        rate_limit: { unit: minute, requests_per_unit: 1 }
  - key: public
    rate_limit: { unlimited: true }
  - key: tenant
    value: vip
    rate_limit: { unit: week, requests_per_unit: 9, replaces: [{ name: actions }] }
"""

CATALOG = """
domain: catalog
descriptors:
  - key: region
    value: north
    descriptors:
      - key: shelf
        metadata:
          owner: team-a
        rate_limit: { unit: second, requests_per_unit: 3 }
      - key: shelf
        value: top
        rate_limit: { unit: second, requests_per_unit: 8 }
  - key: aisle
    metadata:
      quota: { owner: team-b, tickets: [1, 2] }
      note: free-form, never checked
    rate_limit: { unit: month, requests_per_unit: 30 }
"""

GLOBS = """
domain: globs
descriptors:
  - key: doc
    value: docs/*
    share_threshold: true
    rate_limit: { unit: minute, requests_per_unit: 10 }
  - key: doc
    value: draft*
    rate_limit: { unit: minute, requests_per_unit: 11 }
  - key: zone
    value: eu
    descriptors:
      - key: doc
        value: eu/*
        share_threshold: true
        rate_limit: { unit: minute, requests_per_unit: 12 }
  - key: doc
    value: outer/*
    share_threshold: true
    descriptors:
      - key: doc
        value: inner/*
        share_threshold: true
        rate_limit: { unit: minute, requests_per_unit: 13 }
  - key: route
    value: v1/*
    share_threshold: true
    value_to_metric: true
    descriptors:
      - key: verb
        value_to_metric: true
        rate_limit: { unit: minute, requests_per_unit: 14 }
  - key: svc
    value: svc/*
    share_threshold: true
    descriptors:
      - key: op
        detailed_metric: true
        rate_limit: { unit: minute, requests_per_unit: 15 }
  - key: dir
    value: d/*
    share_threshold: true
    descriptors:
      - key: file
        value: f/*
        share_threshold: false
        descriptors:
          - key: kind
            rate_limit: { unit: minute, requests_per_unit: 16 }
  - key: item
    value: exact1
    rate_limit: { unit: minute, requests_per_unit: 17 }
  - key: item
    value: exact*
    share_threshold: true
    rate_limit: { unit: minute, requests_per_unit: 18 }
  - key: mid
    value: /v*x
    share_threshold: true
    rate_limit: { unit: minute, requests_per_unit: 19 }
  - key: multi
    value: a*b*c
    rate_limit: { unit: minute, requests_per_unit: 20 }
  - key: midmetric
    value: /w*y
    share_threshold: true
    value_to_metric: true
    rate_limit: { unit: minute, requests_per_unit: 21 }
  - key: env
    value: e*live
    share_threshold: true
    descriptors:
      - key: res
        value: r*z
        share_threshold: true
        rate_limit: { unit: minute, requests_per_unit: 22 }
  - key: perval
    value: pv*
    value_to_metric: true
    rate_limit: { unit: year, requests_per_unit: 23 }
"""


@pytest.fixture(scope="module")
def config() -> EnvoyConfig:
    return parse_envoy_config(
        [
            (f"{n}.yaml", yaml.safe_load(t))
            for n, t in (("shop", SHOP), ("catalog", CATALOG), ("globs", GLOBS))
        ]
    )


def find(config: EnvoyConfig, domain: str, *entries: tuple[str, str]) -> Match:
    match = config.find(domain, list(entries))
    assert match is not None, entries
    return match


def rpu(config: EnvoyConfig, domain: str, *entries: tuple[str, str]) -> int | None:
    match = config.find(domain, list(entries))
    return None if match is None else match.limit.requests_per_unit


def test_nested_levels_zero_limits_unlimited_shadow_and_multipliers(config: EnvoyConfig) -> None:
    assert rpu(config, "shop", ("origin", "edge"), ("backend", "catalog")) == 4
    assert rpu(config, "shop", ("origin", "edge")) is None  # no limit at that depth
    assert rpu(config, "shop", ("client", "c1")) == 6
    assert rpu(config, "shop", ("client", "c1"), ("action", "read")) == 7
    assert rpu(config, "shop", ("client", "c1"), ("action", "forbidden")) == 0
    burst = find(config, "shop", ("client", "c1"), ("burst", "x")).limit
    assert burst.unit_multiplier == 10 and burst.window_ms == 10_000
    assert find(config, "shop", ("client", "c1"), ("health", "x")).limit.unlimited
    trial = find(config, "shop", ("client", "c1"), ("burst", "trial")).limit
    assert trial.shadow and trial.requests_per_unit == 1
    assert find(config, "shop", ("public", "anything")).limit.unlimited
    assert find(config, "shop", ("tenant", "vip")).limit.replaces == ("actions",)
    assert find(config, "catalog", ("aisle", "7")).limit.window_ms == 30 * 86_400_000


def test_scalar_values_read_as_upstream_reads_them() -> None:
    config = parse_envoy_config(
        [
            (
                "s.yaml",
                yaml.safe_load("domain: s\ndescriptors: [{key: flag, value: true}, {key: n, value: 42}]"),
            )
        ]
    )
    assert set(config.domains["s"].children) == {"flag_true", "n_42"}


def test_metadata_is_free_form_and_kept(config: EnvoyConfig) -> None:
    assert rpu(config, "catalog", ("region", "north"), ("shelf", "s1")) == 3
    assert rpu(config, "catalog", ("region", "north"), ("shelf", "top")) == 8  # explicit beats key-only
    root = config.domains["catalog"]
    assert root.children["aisle"].metadata["quota"] == {"owner": "team-b", "tickets": [1, 2]}
    assert root.children["region_north"].children["shelf"].metadata == {"owner": "team-a"}


@pytest.mark.parametrize(
    ("entries", "limit"),
    [
        ((("doc", "docs/a/b"),), 10),
        ((("doc", "docs/"),), 10),  # `*` matches nothing too
        ((("doc", "draft-7"),), 11),
        ((("zone", "eu"), ("doc", "eu/x")), 12),
        ((("doc", "outer/1"), ("doc", "inner/2")), 13),
        ((("item", "exact1"),), 17),  # the explicit value wins over the wildcard
        ((("item", "exact2"),), 18),
        ((("mid", "/v1x"),), 19),
        ((("mid", "/vx"),), 19),
        ((("multi", "a-b-c"),), 20),
        ((("multi", "abc"),), 20),
        ((("multi", "aXXbYYc"),), 20),
        ((("env", "eu-live"), ("res", "r1z")), 22),
    ],
)
def test_wildcards_match_anywhere_in_the_value(
    config: EnvoyConfig, entries: tuple[tuple[str, str], ...], limit: int
) -> None:
    assert rpu(config, "globs", *entries) == limit


@pytest.mark.parametrize(
    "entries",
    [
        (("mid", "/v1y"),),  # must end in x
        (("mid", "v1x"),),  # must start with /v
        (("multi", "acb"),),  # b must come before c
        (("multi", "a-b-c-d"),),  # the whole value must match
        (("env", "eu-test"), ("res", "r1z")),
        (("doc", "other"),),
    ],
)
def test_a_value_outside_every_pattern_is_unconfigured(
    config: EnvoyConfig, entries: tuple[tuple[str, str], ...]
) -> None:
    assert config.find("globs", list(entries)) is None


def test_share_threshold_shares_one_counter_and_without_it_each_value_has_its_own(
    config: EnvoyConfig,
) -> None:
    a, b = find(config, "globs", ("doc", "docs/a")), find(config, "globs", ("doc", "docs/b"))
    assert a.counter == b.counter == (("doc", "docs/*"),)
    assert a.stats_key == "globs.doc_docs/*"
    c, d = find(config, "globs", ("doc", "draft1")), find(config, "globs", ("doc", "draft2"))
    assert c.counter != d.counter and c.counter == (("doc", "draft1"),)
    nested = find(config, "globs", ("doc", "outer/1"), ("doc", "inner/2"))
    assert nested.counter == (("doc", "outer/*"), ("doc", "inner/*"))
    assert (
        find(config, "globs", ("env", "e1live"), ("res", "r1z")).counter
        == find(config, "globs", ("env", "e2live"), ("res", "r2z")).counter
    )
    # share_threshold: false on a wildcard level: one counter per value at that level
    mixed_a = find(config, "globs", ("dir", "d/1"), ("file", "f/a"), ("kind", "k"))
    mixed_b = find(config, "globs", ("dir", "d/2"), ("file", "f/b"), ("kind", "k"))
    assert mixed_a.counter[0] == mixed_b.counter[0] == ("dir", "d/*")
    assert mixed_a.counter[1] == ("file", "f/a") and mixed_b.counter[1] == ("file", "f/b")
    # key-only levels and explicit values count per value, as the request names them
    assert find(config, "shop", ("client", "c1")).counter == (("client", "c1"),)


def test_stats_keys_follow_value_to_metric_share_threshold_and_detailed_metric(config: EnvoyConfig) -> None:
    assert find(config, "shop", ("client", "c1"), ("action", "read")).stats_key == "shop.client.action"
    assert find(config, "shop", ("tenant", "vip")).stats_key == "shop.tenant_vip"
    # value_to_metric: the runtime value in place of the key-only level; share_threshold keeps
    # the pattern of its own level
    assert (
        find(config, "globs", ("route", "v1/users"), ("verb", "GET")).stats_key == "globs.route_v1/*.verb_GET"
    )
    assert find(config, "globs", ("midmetric", "/w1y")).stats_key == "globs.midmetric_/w*y"
    assert find(config, "globs", ("perval", "pv-9")).stats_key == "globs.perval_pv-9"
    # detailed_metric: the limit's key and the last value
    assert find(config, "globs", ("svc", "svc/a"), ("op", "Get")).stats_key == "globs.svc_svc/*.op_Get"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "domain: d\ndescriptors: [{key: k, rate_limit: {unit: second, requests_per_unit: 1, unit_multiplier: 0}}]",
            "unit_multiplier",
        ),
        (
            "domain: d\ndescriptors: [{key: k, rate_limit: {unit: second, requests_per_unit: 1, unit_multiplier: x}}]",
            "unit_multiplier",
        ),
        ("domain: d\ndescriptors: [{key: k, value: 'a*', share_threshold: maybe}]", "share_threshold"),
        ("domain: d\ndescriptors: [{key: k, value_to_metric: 1}]", "value_to_metric"),
        ("domain: d\ndescriptors: [{key: k, metadata: [1, 2]}]", "'metadata' must be a map"),
        (
            "domain: d\ndescriptors: [{key: k, rate_limit: {unit: second, requests_per_unit: 1, burst: 3}}]",
            "unknown key 'burst'",
        ),
        (
            "domain: d\ndescriptors: [{key: k, rate_limit: {unit: second, requests_per_unit: 1.5}}]",
            "unsupported value",
        ),
    ],
)
def test_bad_values_of_the_newer_keys_are_refused_naming_the_file(text: str, message: str) -> None:
    with pytest.raises(EnvoyConfigError) as info:
        parse_envoy_config([("bad.yaml", yaml.safe_load(text))])
    assert message in str(info.value) and "bad.yaml" in str(info.value)
