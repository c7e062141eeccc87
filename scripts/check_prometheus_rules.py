"""Checks deploy/prometheus/: `promtool check rules` on the rules, then `promtool test rules`
on the unit tests in deploy/prometheus/tests/.

promtool compares an alert's annotations too, and the runbook text is long: most unit tests
assert labels only, so they run against a copy of the rules whose annotations are dropped
(`promtool check rules` has already checked the annotation templates themselves), except for
the alerts some test states `exp_annotations` for: those keep theirs, rendered and compared.

    python scripts/check_prometheus_rules.py [--rules DIR] [--tests DIR]

promtool comes from Debian's `prometheus` package (scripts/ensure_prometheus.sh installs it).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules"
TESTS = ROOT / "deploy" / "prometheus" / "tests"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        raise SystemExit("promtool is not installed: run scripts/ensure_prometheus.sh (Debian's prometheus)")
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=300)


def _without_annotations(rules: dict[str, Any], keep: set[str]) -> dict[str, Any]:
    for group in rules.get("groups", []):
        for rule in group.get("rules", []):
            if rule.get("alert") not in keep:
                rule.pop("annotations", None)
    return rules


def _annotations_tested(test_files: list[Path]) -> set[str]:
    """Alerts whose rendered annotations some unit test states."""
    names: set[str] = set()
    for path in test_files:
        for test in yaml.safe_load(path.read_text()).get("tests", []):
            for case in test.get("alert_rule_test", []):
                if any("exp_annotations" in alert for alert in case.get("exp_alerts") or []):
                    names.add(case["alertname"])
    return names


def check(rules_dir: Path = RULES, tests_dir: Path = TESTS) -> tuple[bool, str]:
    """Runs both promtool commands; returns (ok, what promtool printed)."""
    rule_files = sorted(rules_dir.glob("*.yaml"))
    test_files = sorted(tests_dir.glob("*.yaml"))
    if not rule_files or not test_files:
        return False, f"no rules in {rules_dir} or no tests in {tests_dir}"
    checked = _promtool("check", "rules", *map(str, rule_files))
    output = checked.stdout + checked.stderr
    if checked.returncode != 0:
        return False, output
    keep = _annotations_tested(test_files)
    with tempfile.TemporaryDirectory() as tmp:
        # The tests name their rule files as ../rules/<name>: keep that layout in the copy.
        copy_rules, copy_tests = Path(tmp) / "rules", Path(tmp) / "tests"
        copy_rules.mkdir()
        copy_tests.mkdir()
        for path in rule_files:
            stripped = _without_annotations(yaml.safe_load(path.read_text()), keep)
            (copy_rules / path.name).write_text(yaml.safe_dump(stripped, sort_keys=False))
        for path in test_files:
            shutil.copy(path, copy_tests / path.name)
        tested = _promtool("test", "rules", *(str(copy_tests / p.name) for p in test_files))
    output += tested.stdout + tested.stderr
    return tested.returncode == 0, output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rules", type=Path, default=RULES)
    parser.add_argument("--tests", type=Path, default=TESTS)
    args = parser.parse_args(argv)
    ok, output = check(args.rules, args.tests)
    print(output, end="")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
