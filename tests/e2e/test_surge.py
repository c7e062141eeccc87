"""A short surge through the real suite: the scenario, the load driver and the report work
together, and paid and enterprise traffic rides through a provider outage."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from ballast_demo import report
from ballast_demo.load import run_surge
from ballast_demo.scenario import ScenarioConfig, plan_users, write_suite_config
from services.kit.config import SERVICE_NAMES
from tests.conftest import SuiteFactory
from tests.support.backends import free_port

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "surge-admin"


def test_the_plan_is_deterministic_and_follows_the_ramp() -> None:
    config = ScenarioConfig(duration_s=30, ramp_s=10, start_users=5, peak_users=50)
    first, again = plan_users(config), plan_users(config)
    assert [(u.tier, u.arrive_s, [t.text for s in u.sessions for t in s]) for u in first] == [
        (u.tier, u.arrive_s, [t.text for s in u.sessions for t in s]) for u in again
    ]
    assert len(first) == 50 and sum(1 for u in first if u.arrive_s == 0) == 5
    assert max(u.arrive_s for u in first) == 10
    assert config.users_at(5) == 28 and config.users_at(20) == 50
    tiers = {u.tier for u in first}
    assert tiers == {"free", "paid", "enterprise"}
    kinds = {t.kind for u in first for s in u.sessions for t in s}
    assert {"faq", "paraphrase", "tool", "unique"} <= kinds
    assert (
        plan_users(replace(config, seed=8))[0].sessions != first[0].sessions
        or first[1].tier != plan_users(replace(config, seed=8))[1].tier
    )


@pytest.mark.parametrize("mtls", [False, True], ids=["plaintext", "mtls"])
async def test_paid_and_enterprise_ride_through_an_outage(
    suite_factory: SuiteFactory, tmp_path: Path, mtls: bool
) -> None:
    config = ScenarioConfig(
        duration_s=10,
        ramp_s=3,
        start_users=4,
        peak_users=16,
        think_s=(0.3, 0.8),
        outage_start_s=3,
        outage_s=4,
        primary_latency_ms=20,
        secondary_latency_ms=40,
        tokens_per_second=5000,
        # Tier windows scaled to the 10 s run: a free user's job parked for quota runs within the
        # run's tail, instead of waiting out a minute (the run waited 30 s for the last one).
        window="5s",
    ).with_ports(free_port(), free_port())
    environ = {**write_suite_config(tmp_path, config, ROOT), "BALLAST_EDGE_ADMIN_KEY": ADMIN}
    suite = await suite_factory(SERVICE_NAMES, environ, tls_dir=tmp_path / "certs" if mtls else None)
    state = await run_surge(suite.channel("edge"), suite.channel("router"), ADMIN, config, plan_users(config))
    rows = {row["tier"]: row for row in report.tier_rows(state.events, config)}
    assert rows["all"]["requests"] > 20
    for tier in ("paid", "enterprise"):
        if tier in rows:
            assert rows[tier]["failed"] == 0, rows[tier]
    # The outage really happened: some answers needed a second provider.
    assert rows["all"]["failovers"] > 0
    assert rows["all"]["upstream_429s"] == 0
    assert "| all |" in report.markdown_table(list(rows.values()))
    if not mtls:  # the chart is drawn from the events alike over either transport: once is enough
        report.chart(state.events, config, tmp_path / "surge.png", "test")
        assert (tmp_path / "surge.png").stat().st_size > 10_000
