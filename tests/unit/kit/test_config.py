"""Settings come from BALLAST_* variables; a bad value stops start-up naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

import pytest

from services import registry
from services.cache.config import CacheSettings
from services.edge.config import EdgeSettings
from services.kit.config import DEFAULT_PORTS, ConfigError, Env, ServerSettings
from services.limiter.config import LimiterSettings
from services.router.config import BreakerSettings, RetrySettings, RouterSettings, TimeoutSettings
from services.sessions.config import SessionsSettings


def test_defaults_give_the_well_known_ports() -> None:
    for name, port in DEFAULT_PORTS.items():
        assert ServerSettings.from_env(name, Env({})).port == port
    assert DEFAULT_PORTS == {
        "edge": 50051,
        "router": 50052,
        "limiter": 50053,
        "cache": 50054,
        "sessions": 50055,
    }


@pytest.mark.parametrize(
    ("settings_class", "read", "per_service"),
    [
        # The well-known ports and the peers' addresses come from DEFAULT_PORTS, per service.
        (
            ServerSettings,
            lambda env: ServerSettings.from_env("limiter", env),
            {"port", "metrics_port", "addresses"},
        ),
        (LimiterSettings, LimiterSettings.from_env, set()),
        (SessionsSettings, SessionsSettings.from_env, set()),
        # The policy is read from the default file (config/cache.yaml); the field says "no file".
        (CacheSettings, CacheSettings.from_env, {"policy"}),
        (EdgeSettings, EdgeSettings.from_env, set()),
        # The catalog is found and loaded when no file is named; the field says "none given".
        (RouterSettings, RouterSettings.from_env, {"catalog", "catalog_file"}),
        (RetrySettings, lambda env: RouterSettings.from_env(env).retry, set()),
        (TimeoutSettings, lambda env: RouterSettings.from_env(env).timeouts, set()),
        (BreakerSettings, lambda env: RouterSettings.from_env(env).breaker, set()),
    ],
)
def test_an_unset_variable_gives_the_default_written_on_the_field(
    settings_class: type, read: Callable[[Env], Any], per_service: set[str]
) -> None:
    """Each default is written once, on the dataclass field; from_env reads it from there."""
    settings = read(Env({}))
    defaults: dict[str, Any] = {}
    for f in fields(settings_class):
        if f.default is not MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not MISSING:
            defaults[f.name] = f.default_factory()
    assert len(defaults) >= 5
    for name, default in defaults.items():
        if name not in per_service:  # the well-known ports differ per service (DEFAULT_PORTS)
            value = getattr(settings, name)
            assert value == default and type(value) is type(default), name


def test_values_are_parsed_and_typed() -> None:
    env = Env(
        {
            "BALLAST_LIMITER_PORT": "6000",
            "BALLAST_GRACE_PERIOD": "250ms",
            "BALLAST_LOG_LEVEL": "DEBUG",
            "BALLAST_CAPTURE_CONTENT": "yes",
            "BALLAST_ROUTER_ADDR": "router:50052",
        }
    )
    settings = ServerSettings.from_env("limiter", env)
    env.check()
    assert settings.port == 6000
    assert settings.grace_period == pytest.approx(0.25)
    assert settings.log_level == "debug"
    assert settings.capture_content is True
    assert settings.addresses["router"] == "router:50052"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("BALLAST_LOG_LEVEL", "loud", "one of debug, info, warning, error"),
        ("BALLAST_LOG_FORMAT", "xml", "one of json, text"),
        ("BALLAST_EDGE_PORT", "70000", "an integer from 0 to 65535"),
        ("BALLAST_EDGE_PORT", "abc", "an integer from 0 to 65535"),
        ("BALLAST_GRACE_PERIOD", "soon", "a duration"),
        ("BALLAST_CAPTURE_CONTENT", "maybe", "one of true, false"),
        ("BALLAST_CACHE_ADDR", "nowhere", "host:port"),
        ("BALLAST_METRICS_MAX_TENANTS", "0", "an integer from 1 to 100000"),
        ("BALLAST_LOCAL_CALLS", "sometimes", "one of true, false"),
        ("BALLAST_MALLOC_ARENAS", "-1", "an integer from 0 to 1024"),
        ("BALLAST_MALLOC_ARENAS", "two", "an integer from 0 to 1024"),
        ("BALLAST_EVENT_LOOP", "tokio", "one of uvloop, asyncio"),
        ("BALLAST_BLAS_THREADS", "-1", "an integer from 0 to 1024"),
        ("BALLAST_ROUTER_STREAM_FLUSH_INTERVAL", "soon", "a duration"),
        ("BALLAST_ROUTER_STREAM_FLUSH_INTERVAL", "-5ms", "a duration"),
        ("BALLAST_ROUTER_MAX_RESPONSE_HEAD_BYTES", "100", "an integer from 1024 to 1048576"),
        ("BALLAST_ROUTER_MAX_RESPONSE_HEAD_BYTES", "lots", "an integer from 1024 to 1048576"),
    ],
)
def test_bad_values_name_the_variable_and_what_is_allowed(variable: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        registry.load_all_settings(["edge", "router"], {variable: value})
    message = str(info.value)
    assert f"{variable}={value!r}" in message
    assert expected in message


def test_addresses_may_list_replicas_or_be_grpc_targets() -> None:
    from services.kit.clients import channel_target

    env = Env(
        {
            "BALLAST_ROUTER_ADDR": "127.0.0.1:6001,127.0.0.1:6002",
            "BALLAST_CACHE_ADDR": "dns:///cache.internal:50054",
            "BALLAST_LIMITER_ADDR": "127.0.0.1:6001,nowhere",
        }
    )
    settings = ServerSettings.from_env("edge", env)
    assert channel_target(settings.addresses["router"]) == "ipv4:127.0.0.1:6001,127.0.0.1:6002"
    assert channel_target(settings.addresses["cache"]) == "dns:///cache.internal:50054"
    assert len(env.problems) == 1 and "BALLAST_LIMITER_ADDR" in env.problems[0]


def test_a_moved_port_moves_the_address_the_others_dial() -> None:
    # `BALLAST_ROUTER_PORT=6100 ballast up`: the edge in the same suite must dial 6100, not the
    # well-known port; an explicit address still wins, and port 0 (free) keeps the default.
    env = Env(
        {
            "BALLAST_ROUTER_PORT": "6100",
            "BALLAST_CACHE_PORT": "0",
            "BALLAST_LIMITER_PORT": "6200",
            "BALLAST_LIMITER_ADDR": "limiter:7000",
        }
    )
    settings = ServerSettings.from_env("edge", env)
    env.check()
    assert settings.addresses["router"] == "127.0.0.1:6100"
    assert settings.addresses["cache"] == f"127.0.0.1:{DEFAULT_PORTS['cache']}"
    assert settings.addresses["limiter"] == "limiter:7000"
    assert settings.addresses["sessions"] == f"127.0.0.1:{DEFAULT_PORTS['sessions']}"


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        registry.load_all_settings(["edge"], {"BALLAST_LOG_LEVEL": "x", "BALLAST_EDGE_PORT": "-1"})
    assert len(info.value.problems) == 2


def test_bad_value_stops_the_process_with_the_message() -> None:
    env = {**os.environ, "BALLAST_LOG_FORMAT": "xml", "BALLAST_LIMITER_PORT": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "services.limiter"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "BALLAST_LOG_FORMAT='xml' is invalid: expected one of json, text" in result.stderr
