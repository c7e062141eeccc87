"""What the dashboard and rules tests share: the metric names the code defines, the recording
rules, and the PromQL of every dashboard panel with Grafana's variables filled in."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
RULES = ROOT / "deploy" / "prometheus" / "rules"

_SUFFIXES = {
    "create_counter": ("_total",),
    "create_observable_counter": ("_total",),
    "create_histogram": ("_bucket", "_count", "_sum"),
    "create_observable_gauge": ("",),
    "create_up_down_counter": ("",),
    "create_observable_up_down_counter": ("",),
}
# Units the Prometheus exporter appends to a name; `{…}` annotations are dropped.
_UNIT_SUFFIX = {"s": "_seconds", "By": "_bytes"}


def code_metrics() -> set[str]:
    """Prometheus names of every OpenTelemetry instrument created in services/ (as exported)."""
    names = {"up", "target_info"}
    for path in (ROOT / "services").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            suffixes = _SUFFIXES.get(node.func.attr)
            if suffixes is None or not node.args or not isinstance(node.args[0], ast.Constant):
                continue
            base = str(node.args[0].value).replace(".", "_")
            unit = next(
                (
                    k.value.value
                    for k in node.keywords
                    if k.arg == "unit" and isinstance(k.value, ast.Constant)
                ),
                "",
            )
            base += _UNIT_SUFFIX.get(str(unit), "")
            names.update(base + suffix for suffix in suffixes)
    return names


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for path in sorted(RULES.glob("*.yaml")):
        groups.extend(yaml.safe_load(path.read_text())["groups"])
    return groups


def recorded_metrics() -> set[str]:
    return {rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule}


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panel_queries() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(dashboard file, panel, target) for every query of every panel."""
    for name, dashboard in dashboards().items():
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                yield name, panel, target


def fill_variables(expr: str, *, rate_interval: str = "1m", range_: str = "1h") -> str:
    """The PromQL Grafana sends with every template variable on "All" (.*)."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
    return re.sub(r"\$\{?(region|tenant|tier|model)\}?", ".*", expr)


_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (not functions, labels, keywords or variables)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _KEYWORDS or re.fullmatch(r"\d.*", word):
            continue
        names.add(word)
    return names
