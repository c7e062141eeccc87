"""Configuration for suites in tests and benchmarks: fast simulated providers, small tiers.

The simulated providers keep their wire formats but answer in a few milliseconds, and the
tiers are small so that limits are reached in a handful of calls.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
ADMIN_KEY = "admin-" + secrets.token_hex(8)
WEBHOOK_SECRET = "whsec_" + secrets.token_hex(8)

TEST_TIERS: dict[str, Any] = {
    "free": {
        "priority": "low",
        "requests": {"limit": 3, "window": "1h"},
        "user_tokens_per_day": {"limit": 200000},
        "tenant_tokens_per_day": {"limit": 2000000},
        "session_tool_calls": {"limit": 2},
    },
    "paid": {
        "priority": "normal",
        "requests": {"limit": 200, "window": "1h"},
        "user_tokens_per_day": {"limit": 2000000},
        "tenant_tokens_per_day": {"limit": 50000000},
        "session_tool_calls": {"limit": 25},
    },
    "enterprise": {
        "priority": "high",
        "requests": {"unlimited": True},
        "user_tokens_per_day": {"unlimited": True},
        "tenant_tokens_per_day": {"limit": 1000000000},
        "session_tool_calls": {"limit": 100},
    },
}


def write_test_config(
    folder: Path, *, sim_latency_ms: float = 2.0, sim_rpm: int | None = None
) -> dict[str, str]:
    """A fast catalog and small tiers in `folder`; returns the variables that point at them."""
    catalog = yaml.safe_load((ROOT / "config" / "router_catalog.yaml").read_text())
    for provider in catalog["providers"].values():
        if provider.get("kind") == "sim":
            provider["sim"]["latency"] = {
                "distribution": "fixed",
                "median_ms": sim_latency_ms,
                "p99_ms": sim_latency_ms,
            }
            provider["sim"]["tokens_per_second"] = 5000
            if sim_rpm is not None:
                provider["sim"]["rpm"] = sim_rpm
                provider["sim"]["tpm"] = sim_rpm * 1000
    (folder / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    tiers = yaml.safe_load((ROOT / "config" / "limiter_tiers.yaml").read_text())
    tiers["tiers"] = TEST_TIERS
    (folder / "tiers.yaml").write_text(yaml.safe_dump(tiers))
    return {
        "BALLAST_ROUTER_CATALOG_FILE": str(folder / "catalog.yaml"),
        "BALLAST_LIMITER_TIERS_FILE": str(folder / "tiers.yaml"),
        "BALLAST_EDGE_ADMIN_KEY": ADMIN_KEY,
        "BALLAST_EDGE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "BALLAST_EDGE_WEBHOOK_BACKOFF": "50ms",
        # Longer than the free tier's hourly window, so a limited job waits in the queue.
        "BALLAST_EDGE_JOB_MAX_WAIT": "2h",
        "BALLAST_SESSIONS_COMPACTION": "false",
    }
