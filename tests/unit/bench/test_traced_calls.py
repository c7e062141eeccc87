"""bench/traced_calls.py runs each telemetry setting with exactly the variables it names."""

from __future__ import annotations

import pytest

from bench.support import ROOT
from bench.traced_calls import WARM_UP_CALLS, _environment


def test_off_carries_no_opentelemetry_variable_even_from_the_callers_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://elsewhere:4317")
    env = _environment("off", 4317, 3000, ROOT)
    assert not [name for name in env if name.startswith("OTEL_")]


def test_unsampled_and_export_send_to_the_local_collector_and_differ_only_in_sampling() -> None:
    unsampled, export = _environment("unsampled", 4999, 3000, ROOT), _environment("export", 4999, 3000, ROOT)
    for env in (unsampled, export):
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:4999"
        assert env["OTEL_METRICS_EXPORTER"] == "none"
        # Room for both spans of every call: a full queue would measure the SDK dropping spans.
        assert int(env["OTEL_BSP_MAX_QUEUE_SIZE"]) >= 2 * (3000 + WARM_UP_CALLS)
    assert unsampled["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert unsampled["OTEL_TRACES_SAMPLER_ARG"] == "0"
    assert "OTEL_TRACES_SAMPLER" not in export
    assert {k: v for k, v in unsampled.items() if not k.startswith("OTEL_TRACES_SAMPLER")} == export


def test_each_tree_runs_its_own_code() -> None:
    env = _environment("off", 4317, 10, ROOT / "elsewhere")
    assert env["PYTHONPATH"].split(":")[:2] == [str(ROOT / "elsewhere"), str(ROOT / "elsewhere" / "gen")]
