"""Cache settings and the policy file: per-namespace thresholds and TTLs, tenant caps, tool TTLs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from ballast.cache.v1 import cache_pb2
from google.protobuf import duration_pb2

from services.cache.config import CachePolicy, CacheSettings, NamespacePolicy, parse_policy
from services.kit.config import ConfigError, Env
from services.kit.yamlfile import YamlFileError
from tests.conftest import SuiteFactory
from tests.unit.cache.helpers import lookup, scope, store

POLICY = """
namespaces:
  strict: {threshold: 0.99}
  t1/loose: {threshold: 0.5, default_ttl: 2m}
tenants:
  t1: {max_ttl: 10m}
tools:
  weather: 1m
  balance: 0
"""


def test_the_shipped_policy_file_parses() -> None:
    env = Env({"BALLAST_CACHE_FILE": "config/cache.yaml"})
    settings = CacheSettings.from_env(env)
    env.check()
    assert settings.policy.tool_ttl["get_weather"] == 600
    assert settings.policy.namespaces["faq"].threshold == 0.92


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("namespaces: {a: {threshold: 2}}", "cache.yaml:1: namespaces.a.threshold: 2 must be from 0 to 1"),
        (
            "\ntenants: {t: {max_ttl: soon}}",
            "cache.yaml:2: tenants.t.max_ttl: expected a duration (0 or more)",
        ),
        ("tenants: {t: {max_bytes: -1}}", "cache.yaml:1: tenants.t.max_bytes: -1 must be at least 0"),
        ("tenants: {t: {}}", "cache.yaml:1: tenants.t: expected max_ttl and/or max_bytes"),
        ("tools: {a: soon, b: {tll: 1m}}", "cache.yaml:1: tools.a: expected a duration (0 or more)"),
        ("tools: {a: soon, b: {tll: 1m}}", "cache.yaml:1: tools.b: unknown key 'tll' (allowed: ttl)"),
        ("colours: {}", "cache.yaml:1: cache policy: unknown key 'colours'"),
        ("[1, 2]", "cache.yaml:1: cache policy must be a mapping"),
        ("tools: {a: [1,\n", "cache.yaml:2: not valid YAML"),
    ],
)
def test_bad_policy_files_are_reported(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "cache.yaml"
    path.write_text(text)
    env = Env(
        {
            "BALLAST_CACHE_FILE": str(path),
            "BALLAST_CACHE_THRESHOLD": "1.5",
            "BALLAST_CACHE_EMBEDDER": "gpu",
            "BALLAST_CACHE_MODEL_PATH": "/no/such/model.onnx",
        }
    )
    CacheSettings.from_env(env)
    with pytest.raises(ConfigError) as info:
        env.check()
    message = str(info.value)
    assert problem in message and "BALLAST_CACHE_THRESHOLD" in message and "BALLAST_CACHE_EMBEDDER" in message
    assert "BALLAST_CACHE_MODEL_PATH" in message


def test_parse_policy_values() -> None:
    policy = parse_policy(POLICY)
    assert policy.namespaces["t1/loose"].default_ttl == 120 and policy.tenant_max_ttl["t1"] == 600
    assert policy.namespaces["strict"] == NamespacePolicy(threshold=0.99, default_ttl=None)
    assert policy.tool_ttl == {"weather": 60, "balance": 0}
    assert parse_policy("tools: {w: {ttl: 30s}}\ntenants: {t: {max_bytes: 0}}\nnamespaces:\n") == CachePolicy(
        tool_ttl={"w": 30}, tenant_max_bytes={"t": 0}
    )
    assert parse_policy("") == CachePolicy()


def test_every_policy_problem_is_reported_at_once() -> None:
    with pytest.raises(YamlFileError) as info:
        parse_policy("namespaces: {a: {threshold: 2}}\ntools: {a: soon}\n", "p.yaml")
    assert info.value.problems == [
        "p.yaml:1: namespaces.a.threshold: 2 must be from 0 to 1",
        "p.yaml:2: tools.a: expected a duration (0 or more) such as 250ms, 5s, 2m, 1h or 1d",
    ]


async def test_policy_applies_to_lookups_and_stores(suite_factory: SuiteFactory, tmp_path: Path) -> None:
    path = tmp_path / "cache.yaml"
    path.write_text(POLICY)
    suite = await suite_factory(["cache"], {"BALLAST_CACHE_FILE": str(path)})
    cache = suite.cache
    for ns in ("strict", "loose"):
        await cache.Store(store("How do I reset my password?", "Link.", namespace=ns))
    question = "How do I reset my password please?"
    assert not (await cache.Lookup(lookup(question, namespace="strict"))).hit
    assert (await cache.Lookup(lookup(question, namespace="loose"))).hit
    assert (
        await cache.Lookup(lookup(question, namespace="strict", threshold=0.5))
    ).hit  # per-request override
    put = cache_pb2.PutToolResultRequest(
        scope=scope(), tool_name="weather", arguments_json="{}", result="sun"
    )
    assert (await cache.PutToolResult(put)).stored
    hit = await cache.GetToolResult(cache_pb2.GetToolResultRequest(scope=scope(), tool_name="weather"))
    assert hit.hit and hit.remaining_ttl.seconds <= 60
    put.tool_name = "balance"
    assert not (await cache.PutToolResult(put)).stored
    put.ttl.CopyFrom(duration_pb2.Duration(seconds=86400))
    put.tool_name = "other"
    assert (await cache.PutToolResult(put)).stored
    other = await cache.GetToolResult(cache_pb2.GetToolResultRequest(scope=scope(), tool_name="other"))
    assert 590 <= other.remaining_ttl.seconds <= 600  # capped by tenant t1's max_ttl


def test_semantic_follow_ups_setting_is_validated() -> None:
    assert CacheSettings.from_env(Env({})).semantic_follow_ups is True
    assert (
        CacheSettings.from_env(Env({"BALLAST_CACHE_SEMANTIC_FOLLOW_UPS": "false"})).semantic_follow_ups
        is False
    )
    env = Env({"BALLAST_CACHE_SEMANTIC_FOLLOW_UPS": "sometimes"})
    CacheSettings.from_env(env)
    with pytest.raises(ConfigError, match="BALLAST_CACHE_SEMANTIC_FOLLOW_UPS"):
        env.check()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://h:6379/0?cluster=maybe", "cluster must be true or false, got 'maybe'"),
        ("redis://h:6379/1?cluster=true", "a Redis Cluster has database 0 only, got '1'"),
    ],
)
def test_a_bad_cluster_option_names_the_store_variable(url: str, problem: str) -> None:
    env = Env({"BALLAST_CACHE_STORE": url})
    CacheSettings.from_env(env)
    with pytest.raises(ConfigError, match=re.escape(f"BALLAST_CACHE_STORE={url!r} is invalid: {problem}")):
        env.check()
    good = Env({"BALLAST_CACHE_STORE": "redis://h:6379/0?cluster=true"})
    CacheSettings.from_env(good)
    good.check()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BALLAST_CACHE_EMBED_INT8_WEIGHTS", "perhaps"),
        ("BALLAST_CACHE_EMBED_CALIBRATED_INT8", "fast"),
        ("BALLAST_CACHE_KEYS_CACHE_BYTES", "-1"),
        ("BALLAST_CACHE_TURNS_CACHE_BYTES", "lots"),
    ],
)
def test_embedder_and_key_cache_settings_name_a_bad_value(variable: str, value: str) -> None:
    env = Env({variable: value})
    CacheSettings.from_env(env)
    with pytest.raises(ConfigError, match=re.escape(f"{variable}={value!r} is invalid")):
        env.check()
    read = CacheSettings.from_env(
        Env(
            {
                "BALLAST_CACHE_EMBED_INT8_WEIGHTS": "false",
                "BALLAST_CACHE_EMBED_CALIBRATED_INT8": "false",
                "BALLAST_CACHE_KEYS_CACHE_BYTES": "0",
                "BALLAST_CACHE_TURNS_CACHE_BYTES": "1024",
            }
        )
    )
    assert (read.embed_int8_weights, read.keys_cache_bytes, read.turns_cache_bytes) == (False, 0, 1024)
    assert read.embed_calibrated_int8 is False and CacheSettings.embed_calibrated_int8 is True


def test_a_memory_store_cache_does_not_load_redis() -> None:
    # redis-py is about 11 MB resident (bench/cache_memory.py); a memory:// cache never uses it.
    # A fresh interpreter: this one has loaded redis for other tests.
    program = (
        "import sys\n"
        "from services.cache.app import ENTRY\n"
        "from services.kit.config import Env\n"
        "import services.kit.entry\n"
        "ENTRY.load(Env({'BALLAST_CACHE_STORE': 'memory://'}))\n"
        "assert 'redis' not in sys.modules, 'redis imported'\n"
        "ENTRY.load(Env({'BALLAST_CACHE_STORE': 'redis://h:6379/0?cluster=true'}))\n"
        "assert 'redis' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
