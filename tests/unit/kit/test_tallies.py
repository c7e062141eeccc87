"""Tallies (services/kit/tallies.py): the services' counters and histograms, aggregated without
the SDK's per-measurement work, must reach Prometheus and OTLP exactly as the SDK's would."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

import pytest
from opentelemetry import metrics
from opentelemetry.sdk.metrics.export import Histogram, MetricsData, Sum
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import generate_latest

from services.kit.tallies import Tallies, TallyCounter, TallyHistogram, TallyMeter
from services.kit.telemetry import METER_NAME, Telemetry, histogram_buckets, setup_telemetry


def _measure(meter: metrics.Meter) -> None:
    """A bit of everything a service records, and what the SDK drops."""
    calls = meter.create_counter("probe.calls", unit="{request}", description="Calls by outcome")
    cost = meter.create_counter("probe.cost", unit="{microdollar}")
    duration = meter.create_histogram("probe.duration", unit="s", description="How long")
    tokens = meter.create_histogram("probe.tokens", unit="{token}")
    sizes = meter.create_histogram("probe.size", unit="By")
    advised = meter.create_histogram(
        "probe.advised", unit="1", explicit_bucket_boundaries_advisory=[0.5, 2, 8]
    )
    depth = meter.create_up_down_counter("probe.depth")
    for i in range(50):
        calls.add(1, {"tier": "paid", "outcome": "ok"})
        calls.add(1, {"outcome": "ok", "tier": "paid"})  # the same set, in another order
        calls.add(2, {"tier": "free", "outcome": "limited", "retry": i % 3 == 0})
        cost.add(150_000 + i, {"model": "sim", "n": 7})
        cost.add(0.25, {"model": "sim", "n": 7})
        duration.record(i / 100, {"method": "Chat"})
        duration.record(0.005, {"method": "Chat"})  # exactly on a bound: that bucket, as the SDK
        duration.record(90.0, {"method": "Slow"})  # past the last bound
        tokens.record(i * 97, {"direction": "input"})
        tokens.record(4, {"direction": "output"})
        sizes.record(i * 40)
        advised.record(i / 10, {"k": "v"})
        depth.add(1 if i % 2 else -1, {"queue": "a"})
    calls.add(1, {"tier": "paid", "tags": ["a", "b"]})  # a sequence value (kept as a tuple)
    calls.add(1, {"tier": "paid", "tags": ["a", "b"]})
    calls.add(1, {"tier": "paid", "bad": {"nested": 1}})  # an invalid value: dropped, as by the SDK
    calls.add(-1, {"tier": "paid", "outcome": "ok"})  # refused
    calls.add(math.nan, {"tier": "paid", "outcome": "ok"})  # refused
    duration.record(-0.1, {"method": "Chat"})  # refused
    duration.record(math.inf, {"method": "Chat"})  # refused
    calls.add(3)  # no attributes


def _scrape(telemetry: Telemetry) -> str:
    return generate_latest(telemetry.registry).decode()


def _lines(telemetry: Telemetry) -> list[str]:
    """The scrape's lines in order: the tallies' families come after the SDK's own, which no
    Prometheus cares about; every line itself must be the same."""
    return sorted(_scrape(telemetry).splitlines())


def _samples(telemetry: Telemetry) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in _scrape(telemetry).splitlines()
        if not line.startswith("#")
    }


def test_prometheus_sees_exactly_what_the_sdk_would_have_written() -> None:
    """The same measurements through the services' meter and through the SDK's own meter of an
    identically set-up provider (as before tallies)."""
    tallied = setup_telemetry("probe", environ={})
    sdk = setup_telemetry("probe", environ={})
    sdk_meter = sdk.meter_provider.get_meter(METER_NAME)
    try:
        assert isinstance(tallied.meter, TallyMeter)
        assert not isinstance(sdk_meter, TallyMeter)
        _measure(tallied.meter)
        _measure(sdk_meter)
        expected = _lines(sdk)
        assert len(expected) > 100
        assert any(line.startswith("probe_duration_seconds_bucket") for line in expected)
        assert _lines(tallied) == expected
        # A second scrape (cumulative: the same again, plus what came since) agrees too; the SDK
        # adds each collection's sum to the last one's, so float sums may differ in the last digit.
        _measure(tallied.meter)
        _measure(sdk_meter)
        assert _samples(tallied) == pytest.approx(_samples(sdk), rel=1e-12)
        assert _samples(tallied).keys() == _samples(sdk).keys()
    finally:
        tallied.shutdown()
        sdk.shutdown()


def test_a_scrape_with_only_tallies_recorded_still_shows_them() -> None:
    """The SDK hands nothing on when it aggregated nothing of its own; the tallies still go."""
    telemetry = setup_telemetry("probe", environ={})
    try:
        assert "probe_calls" not in _scrape(telemetry)
        telemetry.meter.create_counter("probe.calls").add(4, {"tier": "paid"})
        samples = _samples(telemetry)
        series = 'probe_calls_total{cloud_region="local",otel_scope_name="ballast",otel_scope_schema_url="",'
        assert samples[series + 'otel_scope_version="",tier="paid"}'] == 4.0
    finally:
        telemetry.shutdown()


def _tallies(limit: int = 2000) -> Tallies:
    return Tallies(
        Resource.create({"service.name": "probe"}),
        InstrumentationScope(METER_NAME),
        histogram_buckets,
        cardinality_limit=limit,
    )


def test_a_histogram_point_carries_count_sum_min_max_and_buckets() -> None:
    tallies = _tallies()
    histogram = tallies.histogram("probe.duration", "s")
    for value in (0.003, 0.005, 0.2, 45.0, 61.0):
        histogram.record(value, {"method": "Chat"})
    merged = tallies.merged(None)
    assert merged is not None
    [resource] = merged.resource_metrics
    [scope] = resource.scope_metrics
    assert scope.scope == InstrumentationScope(METER_NAME)
    [metric] = scope.metrics
    assert (metric.name, metric.unit) == ("probe.duration", "s")
    assert isinstance(metric.data, Histogram)
    [point] = metric.data.data_points
    assert dict(point.attributes or {}) == {"method": "Chat"}
    assert (point.count, point.min, point.max) == (5, 0.003, 61.0)
    assert point.sum == pytest.approx(106.208)
    assert tuple(point.explicit_bounds) == histogram_buckets("s")
    # 0.003 and 0.005 in the first bucket (le 0.005), 0.2 in le 0.25, 45 in le 60, 61 past the end.
    expected = [0] * (len(point.explicit_bounds) + 1)
    for bucket in (0, 0, 6, 15, 16):
        expected[bucket] += 1
    assert list(point.bucket_counts) == expected


def test_tallies_join_the_sdk_scope_of_the_same_name() -> None:
    """One scope in what is exported, with the SDK's metrics first and the tallies after."""
    telemetry = setup_telemetry("probe", environ={})
    try:
        telemetry.meter.create_up_down_counter("probe.depth").add(2)
        telemetry.meter.create_counter("probe.calls").add(1)
        received: list[MetricsData] = []
        reader = telemetry.meter_provider._metric_readers[0]  # type: ignore[attr-defined]
        reader._deliver = lambda data, timeout, **_: received.append(data)
        reader.collect()
        [data] = received
        [resource] = data.resource_metrics
        [scope] = resource.scope_metrics
        assert [m.name for m in scope.metrics] == ["probe.depth", "probe.calls"]
        assert resource.resource.attributes["service.name"] == "ballast-probe"
        calls = scope.metrics[1].data
        assert isinstance(calls, Sum) and calls.is_monotonic
    finally:
        telemetry.shutdown()


def test_past_the_cardinality_limit_new_sets_share_one_overflow_series() -> None:
    tallies = _tallies(limit=3)
    counter = tallies.counter("probe.calls")
    for tenant in ("a", "b", "c", "d", "e", "a"):
        counter.add(1, {"tenant": tenant})
    merged = tallies.merged(None)
    assert merged is not None
    metric = merged.resource_metrics[0].scope_metrics[0].metrics[0]
    assert isinstance(metric.data, Sum)
    points = {tuple(sorted((p.attributes or {}).items())): p.value for p in metric.data.data_points}
    assert points == {
        (("tenant", "a"),): 2,
        (("tenant", "b"),): 1,
        (("tenant", "c"),): 1,
        (("otel.metric.overflow", True),): 2,
    }


def test_refused_amounts_are_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    tallies = _tallies()
    counter = tallies.counter("probe.calls")
    histogram = tallies.histogram("probe.duration", "s")
    with caplog.at_level(logging.WARNING, logger="services.kit.tallies"):
        counter.add(-1)
        counter.add(math.inf)
        histogram.record(math.nan)
    assert tallies.merged(None) is None
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "Add amount must be non-negative on Counter probe.calls.",
        "Add amount inf is not finite on Counter probe.calls, ignoring measurement.",
        "Record amount nan is not finite on Histogram probe.duration, ignoring measurement.",
    ]


def test_one_name_is_one_instrument() -> None:
    tallies = _tallies()
    assert tallies.counter("probe.calls") is tallies.counter("Probe.Calls")
    with pytest.raises(ValueError, match=r"probe\.calls"):
        tallies.histogram("probe.calls", "s")
    with pytest.raises(ValueError, match="increasing"):
        TallyHistogram("probe.bad", boundaries=(1, 1, 2))


def test_records_from_several_threads_while_collecting_are_all_counted() -> None:
    tallies = _tallies()
    counter = tallies.counter("probe.calls")
    histogram = tallies.histogram("probe.duration", "s")
    per_thread, threads = 20_000, 4
    done = threading.Event()

    def record(index: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(per_thread):
                counter.add(1, {"thread": index % 2})
                histogram.record(0.01, {"thread": index % 2})

        return run

    def collect() -> None:
        while not done.is_set():
            tallies.merged(None)

    collector = threading.Thread(target=collect)
    collector.start()
    workers = [threading.Thread(target=record(i)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    collector.join()
    merged = tallies.merged(None)
    assert merged is not None
    by_name = {m.name: m.data for m in merged.resource_metrics[0].scope_metrics[0].metrics}
    counts = by_name["probe.calls"]
    assert isinstance(counts, Sum)
    assert sorted(p.value for p in counts.data_points) == [2 * per_thread, 2 * per_thread]
    durations = by_name["probe.duration"]
    assert isinstance(durations, Histogram)
    assert sorted(p.count for p in durations.data_points) == [2 * per_thread, 2 * per_thread]
    assert all(sum(p.bucket_counts) == p.count for p in durations.data_points)


def test_a_tally_is_the_api_instrument_it_stands_for() -> None:
    tallies = _tallies()
    assert isinstance(tallies.counter("probe.calls"), metrics.Counter)
    assert isinstance(tallies.histogram("probe.duration", "s"), metrics.Histogram)
    assert isinstance(tallies.counter("probe.other"), TallyCounter)


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_METRICS_EXEMPLAR_FILTER": "trace_based"},
        {"OTEL_METRICS_EXEMPLAR_FILTER": "always_on"},
        {"OTEL_SDK_DISABLED": "true"},
    ],
)
def test_exemplars_or_a_disabled_sdk_keep_the_sdks_instruments(environ: dict[str, str]) -> None:
    """Exemplars need the SDK's reservoirs; a disabled SDK records nothing at all."""
    telemetry = setup_telemetry("probe", environ=environ)
    try:
        assert not isinstance(telemetry.meter, TallyMeter)
        assert not isinstance(telemetry.meter.create_counter("probe.calls"), TallyCounter)
    finally:
        telemetry.shutdown()
