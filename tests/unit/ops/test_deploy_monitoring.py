"""Prometheus and Grafana in compose.yaml, and the Kubernetes monitoring component, agree with
the code: every service is scraped on its metrics port under the job name the alerts use, the
mounted files exist, and the PrometheusRule holds exactly the promtool-tested rules."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.kit.config import DEFAULT_METRICS_PORTS, SERVICE_NAMES
from tests.unit.ops.dashboards import ROOT, dashboards, rule_groups

COMPONENT = ROOT / "deploy" / "kubernetes" / "components" / "monitoring"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_compose_prometheus_scrapes_every_service_under_the_alerts_job_names() -> None:
    config = _yaml(ROOT / "deploy" / "prometheus" / "prometheus.yml")
    compose = _yaml(ROOT / "compose.yaml")["services"]
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert jobs == {f"ballast-{name}": [f"{name}:{DEFAULT_METRICS_PORTS[name]}"] for name in SERVICE_NAMES}
    for name in SERVICE_NAMES:
        # Reachable by Prometheus on the compose network, never published on the host.
        assert str(DEFAULT_METRICS_PORTS[name]) in compose[name]["expose"], name
        assert not any(str(DEFAULT_METRICS_PORTS[name]) in port for port in compose[name].get("ports", []))
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yaml"]


def test_compose_mounts_files_that_exist_where_the_configs_expect_them() -> None:
    compose = _yaml(ROOT / "compose.yaml")["services"]
    mounts: dict[str, str] = {}
    for name in ("prometheus", "grafana"):
        for volume in compose[name]["volumes"]:
            source, target, *_ = volume.split(":")
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume
                mounts[target] = source
    assert mounts["/etc/prometheus/rules"] == "./deploy/prometheus/rules"
    assert mounts["/etc/grafana/dashboards/ballast"] == "./deploy/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    for name in ("prometheus", "grafana"):
        assert all(port.startswith("127.0.0.1:") for port in compose[name]["ports"]), name


def test_promtool_accepts_the_compose_prometheus_config_with_its_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/ensure_prometheus.sh installs it)")
    config = _yaml(ROOT / "deploy" / "prometheus" / "prometheus.yml")
    config["rule_files"] = [str(ROOT / "deploy" / "prometheus" / "rules" / "*.yaml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 2 rule files found" in result.stdout + result.stderr


def test_the_component_scrapes_ballast_pods_and_carries_the_tested_rules() -> None:
    component = _yaml(COMPONENT / "kustomization.yaml")
    assert component["kind"] == "Component"
    for resource in component["resources"]:
        assert (COMPONENT / resource).exists(), resource
    monitor = _yaml(COMPONENT / "podmonitor.yaml")
    assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/part-of": "ballast"}
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics"
    job = next(r for r in endpoint["relabelings"] if r["targetLabel"] == "job")
    assert job["replacement"] == "ballast-$1"
    configmap = _yaml(COMPONENT / "dashboards.yaml")
    assert configmap["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert configmap["data"] == {
        name: json.dumps(body, indent=2) + "\n" for name, body in dashboards().items()
    }
    rule = _yaml(COMPONENT / "prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == rule_groups()


def test_kustomize_builds_the_component_into_an_overlay(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    (tmp_path / "placeholder.yaml").write_text(
        yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "placeholder"}})
    )
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "ballast",
                "resources": ["placeholder.yaml"],
                # kustomize refuses absolute paths: the component relative to this overlay.
                "components": [os.path.relpath(COMPONENT, tmp_path)],
            }
        )
    )
    result = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    kinds = {(d["kind"], d["metadata"]["namespace"]) for d in yaml.safe_load_all(result.stdout)}
    assert {("PodMonitor", "ballast"), ("PrometheusRule", "ballast"), ("ConfigMap", "ballast")} <= kinds
