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
