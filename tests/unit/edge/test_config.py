"""Edge settings that depend on each other are checked together at start-up."""

from __future__ import annotations

import pytest

from services.edge.config import EdgeSettings
from services.kit.config import ConfigError, Env


def test_the_store_pool_must_exceed_the_workers() -> None:
    env = Env({"BALLAST_EDGE_WORKERS": "64", "BALLAST_EDGE_STORE_POOL_SIZE": "64"})
    EdgeSettings.from_env(env)
    with pytest.raises(ConfigError, match="BALLAST_EDGE_STORE_POOL_SIZE=64 is invalid: it must exceed"):
        env.check()


def test_a_bad_cluster_option_names_the_store_variable() -> None:
    env = Env({"BALLAST_EDGE_STORE": "redis://h:6379/2?cluster=true"})
    EdgeSettings.from_env(env)
    with pytest.raises(
        ConfigError, match=r"BALLAST_EDGE_STORE=.* is invalid: a Redis Cluster has database 0 only, got '2'"
    ):
        env.check()


def test_settlement_and_priority_settings_are_read_and_bad_ones_named() -> None:
    env = Env(
        {
            "BALLAST_EDGE_PRIORITY_CALL_TIMEOUT": "15s",
            "BALLAST_EDGE_SETTLE_WAIT": "500ms",
            "BALLAST_EDGE_SETTLE_BATCH": "7",
            "BALLAST_EDGE_FREE_CHAT_MAX_WAIT": "1s",
            "BALLAST_EDGE_PACED_FREE_MIN": "3",
        }
    )
    settings = EdgeSettings.from_env(env)
    env.check()
    assert (settings.priority_call_timeout, settings.settle_wait, settings.settle_batch) == (15.0, 0.5, 7)
    assert (settings.free_chat_max_wait, settings.paced_free_min) == (1.0, 3)
    bad = Env({"BALLAST_EDGE_SETTLE_WAIT": "soon", "BALLAST_EDGE_SETTLE_BATCH": "0"})
    EdgeSettings.from_env(bad)
    with pytest.raises(ConfigError) as info:
        bad.check()
    assert "BALLAST_EDGE_SETTLE_WAIT" in str(info.value) and "BALLAST_EDGE_SETTLE_BATCH" in str(info.value)
