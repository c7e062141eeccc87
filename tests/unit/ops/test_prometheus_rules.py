"""deploy/prometheus/: promtool accepts the rules, every alert has a runbook, and the unit tests
pass and would catch an alert that never fires or always fires."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts.check_prometheus_rules import RULES, TESTS, check

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def _promtool() -> None:
    if shutil.which("promtool") is None:
        message = "promtool is not installed (scripts/ensure_prometheus.sh installs Debian's prometheus)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def _rules(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((RULES / name).read_text())
    return data


def _alerts() -> list[dict[str, Any]]:
    return [rule for group in _rules("alerts.yaml")["groups"] for rule in group["rules"]]


def test_promtool_checks_and_unit_tests_pass() -> None:
    ok, output = check()
    assert ok, output
    assert "SUCCESS" in output


def test_every_alert_has_a_runbook_severity_and_unit_test() -> None:
    tested = set(re.findall(r"alertname: (\w+)", "".join(p.read_text() for p in TESTS.glob("*.yaml"))))
    for alert in _alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in ("page", "ticket"), name
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert len(annotations["runbook"].split()) >= 20, f"{name}: the runbook says too little"
        assert name in tested, f"{name} has no promtool unit test"


def _mutated(tmp_path: Path, expr: str) -> tuple[bool, str]:
    rules = tmp_path / "rules"
    tests = tmp_path / "tests"
    shutil.copytree(RULES, rules)
    shutil.copytree(TESTS, tests)
    alerts = _rules("alerts.yaml")
    for group in alerts["groups"]:
        for rule in group["rules"]:
            rule["expr"] = expr
    (rules / "alerts.yaml").write_text(yaml.safe_dump(alerts, sort_keys=False))
    return check(rules, tests)


@pytest.mark.parametrize("expr", ["vector(1) > 2", "vector(1)"], ids=["never-fires", "always-fires"])
def test_the_unit_tests_catch_every_alert_that_never_or_always_fires(tmp_path: Path, expr: str) -> None:
    ok, output = _mutated(tmp_path, expr)
    assert not ok
    failed = set(re.findall(r"alertname: (\w+)", output))
    assert failed == {alert["alert"] for alert in _alerts()}, output[-3000:]
