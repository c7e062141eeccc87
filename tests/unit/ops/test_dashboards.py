"""deploy/grafana/: the dashboards are generated and fresh, every panel has a datasource and a
query, the template variables resolve, every query parses and reads only metrics the code or the
recording rules define; the provisioning files point Grafana at them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.unit.ops.dashboards import (
    ROOT,
    code_metrics,
    dashboards,
    fill_variables,
    metric_names,
    panel_queries,
    recorded_metrics,
    rule_groups,
)

VARIABLES = {"datasource", "region", "tenant", "tier", "model"}
BUILTINS = {"__rate_interval", "__range", "__all"}
REQUIRED = {
    "ballast-overview.json",
    "ballast-cost.json",
    "ballast-providers.json",
    "ballast-queue.json",
    *(f"ballast-{name}.json" for name in ("edge", "router", "limiter", "cache", "sessions")),
}


def test_the_committed_dashboards_are_what_the_generator_writes() -> None:
    script = ROOT / "scripts" / "gen_monitoring.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_check_fails_on_a_hand_edited_dashboard(tmp_path: Path) -> None:
    out = tmp_path / "dashboards"
    shutil.copytree(ROOT / "deploy" / "grafana" / "dashboards", out)
    path = out / "ballast-cost.json"
    path.write_text(path.read_text().replace("Spend in range", "Spend"))
    script = ROOT / "scripts" / "gen_monitoring.py"
    result = subprocess.run(
        [sys.executable, str(script), "--check", "--out", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 1 and "ballast-cost.json" in result.stderr


def test_an_overview_cost_providers_queue_and_one_per_service() -> None:
    found = dashboards()
    assert set(found) == REQUIRED
    assert len({d["uid"] for d in found.values()}) == len(found)


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_panel_has_a_datasource_and_a_query(name: str) -> None:
    dashboard = dashboards()[name]
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_the_variables_resolve(name: str) -> None:
    templating = dashboards()[name]["templating"]["list"]
    defined = {variable["name"] for variable in templating}
    assert defined == VARIABLES
    known = code_metrics()
    for variable in templating:
        if variable["type"] == "datasource":
            assert variable["query"] == "prometheus"
            continue
        query = variable["query"]["query"]
        match = re.fullmatch(r"label_values\((\w+)(\{.*\})?, (\w+)\)", query)
        assert match, query
        assert match.group(1) in known, query
        # Variables only use variables defined before them (Grafana resolves them in order).
        for used in re.findall(r"\$(\w+)", query):
            assert used in defined and used != variable["name"], query
    # Every variable a query uses is defined here (or is one of Grafana's own).
    for _, panel, target in panel_queries():
        for used in re.findall(r"\$\{?(\w+)\}?", target["expr"]):
            assert used in defined | BUILTINS, (panel["title"], used)


def test_every_query_reads_only_metrics_the_code_or_the_rules_define() -> None:
    known = code_metrics() | recorded_metrics()
    for name, panel, target in panel_queries():
        names = metric_names(target["expr"])
        assert names, (name, panel["title"])
        assert names <= known, (name, panel["title"], names - known)
    for group in rule_groups():
        for rule in group["rules"]:
            missing = metric_names(rule["expr"]) - known
            assert not missing, (rule.get("record") or rule.get("alert"), missing)


def test_the_metric_name_reader_sees_through_promql() -> None:
    expr = (
        'sum by (tenant) (rate(ballast_usage_cost_total{cloud_region=~"$region"}[5m])) * 3600 / 1e6'
        " / on (tier) group_left () max(ballast:slo_error_budget:ratio offset 1h)"
    )
    assert metric_names(expr) == {"ballast_usage_cost_total", "ballast:slo_error_budget:ratio"}
    assert "ballast_edge_chat_duration_seconds_bucket" in code_metrics()
    assert "ballast_usage_cost_total" in code_metrics()


def test_every_query_parses(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/ensure_prometheus.sh installs it)")
    rules = [
        {"record": f"dashboard:query_{index}:check", "expr": fill_variables(target["expr"])}
        for index, (_, _, target) in enumerate(panel_queries())
    ]
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboards() -> None:
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert [s["type"] for s in sources["datasources"]] == ["prometheus"]
    providers = yaml.safe_load((provisioning / "dashboards" / "ballast.yaml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/etc/grafana/dashboards/ballast"
