"""Tracing is on only when someone takes the spans: an exporter or a processor given in code."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.kit.config import ConfigError
from services.kit.tallies import TallyCounter
from services.kit.telemetry import Telemetry, setup_telemetry
from tests.support.waiting import eventually


def test_without_an_exporter_no_span_is_made_and_no_interceptor_runs() -> None:
    telemetry = setup_telemetry("probe", environ={})
    try:
        assert not telemetry.tracing
        assert telemetry.server_interceptors() == []
        assert telemetry.client_spans() is None
        with telemetry.tracer.start_as_current_span("work") as span:
            assert not span.is_recording()
    finally:
        telemetry.shutdown()


def test_an_exporter_that_is_switched_off_leaves_tracing_off() -> None:
    environ = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317", "OTEL_TRACES_EXPORTER": "none"}
    telemetry = setup_telemetry("probe", environ=environ)
    try:
        assert not telemetry.tracing
    finally:
        telemetry.shutdown()


def test_an_otlp_endpoint_turns_tracing_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing listens there: shutdown's flush gives up on the span after this, not after the
    # exporter's default 10 s of retries.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "0.5")
    telemetry = setup_telemetry(
        "probe", environ={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"}
    )
    try:
        assert telemetry.tracing
        assert len(telemetry.server_interceptors()) == 1
        with telemetry.tracer.start_as_current_span("work") as span:
            assert span.is_recording()
    finally:
        telemetry.shutdown()


def test_a_processor_given_in_code_receives_the_spans() -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry("probe", environ={}, extra_processors=[SimpleSpanProcessor(exporter)])
    try:
        assert telemetry.tracing
        with telemetry.tracer.start_as_current_span("work"):
            pass
        assert [span.name for span in exporter.get_finished_spans()] == ["work"]
    finally:
        telemetry.shutdown()


def test_the_sdk_switch_wins_over_a_processor() -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(
        "probe", environ={"OTEL_SDK_DISABLED": "true"}, extra_processors=[SimpleSpanProcessor(exporter)]
    )
    try:
        assert not telemetry.tracing
        with telemetry.tracer.start_as_current_span("work"):
            pass
        assert exporter.get_finished_spans() == ()
    finally:
        telemetry.shutdown()


def test_spans_are_encoded_for_otlp_grouped_by_their_service() -> None:
    # The resource hashes once (kit/telemetry.py _HashedOnce); the exporter's grouping of spans by
    # resource must still see one resource per service and equal resources as one.
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource

    exporter = InMemorySpanExporter()
    made = [
        setup_telemetry(name, environ={}, extra_processors=[SimpleSpanProcessor(exporter)])
        for name in ("probe", "probe", "other")
    ]
    try:
        for telemetry in made:
            with telemetry.tracer.start_as_current_span("work"):
                pass
        spans = exporter.get_finished_spans()
        plain = Resource.create(dict(spans[0].resource.attributes))
        assert hash(spans[0].resource) == hash(plain) and spans[0].resource == plain
        encoded = encode_spans(spans)
        services = sorted(
            (
                next(a.value.string_value for a in group.resource.attributes if a.key == "service.name"),
                sum(len(scope.spans) for scope in group.scope_spans),
            )
            for group in encoded.resource_spans
        )
        assert services == [("ballast-other", 1), ("ballast-probe", 2)]
    finally:
        for telemetry in made:
            telemetry.shutdown()


class _MetricsCollector(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.exports = 0
        self.requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []

    async def Export(
        self, request: metrics_service_pb2.ExportMetricsServiceRequest, context: Any
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        self.exports += 1
        self.requests.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def last_sum(self, name: str) -> float | None:
        """The newest value a push carried for the sum `name`."""
        for request in reversed(self.requests):
            for resource in request.resource_metrics:
                for scope in resource.scope_metrics:
                    for metric in scope.metrics:
                        if metric.name == name:
                            return sum(point.as_int or point.as_double for point in metric.sum.data_points)
        return None


@pytest.mark.parametrize(("setting", "exported"), [({}, True), ({"OTEL_METRICS_EXPORTER": "none"}, False)])
async def test_metrics_go_over_otlp_unless_their_exporter_is_switched_off(
    setting: dict[str, str], exported: bool
) -> None:
    """A trace-only collector (Jaeger) refuses metrics: OTEL_METRICS_EXPORTER=none keeps them on
    the Prometheus endpoint only, and each measurement is aggregated once instead of twice."""
    server = grpc.aio.server()
    collector = _MetricsCollector()
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        environ = {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"http://127.0.0.1:{port}", **setting}
        telemetry = setup_telemetry("probe", environ=environ)
        telemetry.meter.create_counter("probe_calls").add(1)
        # Shutting down exports what was recorded once more, whatever the export interval.
        await asyncio.to_thread(telemetry.shutdown)
    finally:
        await server.stop(0)
    assert (collector.exports > 0) is exported


@pytest.mark.parametrize(
    ("metrics_exporter", "exemplar_filter", "expected"),
    [
        ("otlp", None, "AlwaysOffExemplarFilter"),
        ("none", None, "AlwaysOffExemplarFilter"),
        ("otlp", "trace_based", "TraceBasedExemplarFilter"),
        ("otlp", "ALWAYS_ON", "AlwaysOnExemplarFilter"),
        ("none", "trace_based", "TraceBasedExemplarFilter"),
    ],
)
def test_exemplars_are_offered_only_when_asked(
    monkeypatch: pytest.MonkeyPatch, metrics_exporter: str, exemplar_filter: str | None, expected: str
) -> None:
    """Offering every measurement in a sampled span to the readers' reservoirs cost 7-10% of a
    chat's CPU with every trace exported, and only OTLP carries exemplars: none unless asked."""
    # The SDK would read the process's own variable; the service reads the environ it is given.
    monkeypatch.setenv("OTEL_METRICS_EXEMPLAR_FILTER", "always_on")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "0.5")  # nothing listens on the endpoint
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
        "OTEL_METRICS_EXPORTER": metrics_exporter,
    }
    if exemplar_filter is not None:
        environ["OTEL_METRICS_EXEMPLAR_FILTER"] = exemplar_filter
    telemetry = setup_telemetry("probe", environ=environ)
    try:
        assert telemetry.tracing
        chosen = telemetry.meter_provider._sdk_config.exemplar_filter  # type: ignore[attr-defined]
        assert type(chosen).__name__ == expected
    finally:
        telemetry.shutdown()


def test_an_unknown_exemplar_filter_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="OTEL_METRICS_EXEMPLAR_FILTER"):
        setup_telemetry("probe", environ={"OTEL_METRICS_EXEMPLAR_FILTER": "sometimes"})


async def _metrics_collector() -> tuple[grpc.aio.Server, _MetricsCollector, int]:
    server = grpc.aio.server()
    collector = _MetricsCollector()
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, collector, port


def _scraped(telemetry: Telemetry, name: str) -> list[float]:
    from prometheus_client import generate_latest

    return [
        float(line.rsplit(" ", 1)[1])
        for line in generate_latest(telemetry.registry).decode().splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    ]


async def test_one_aggregation_serves_the_prometheus_endpoint_and_the_otlp_push() -> None:
    """Each reader aggregates every measurement again: with OTLP's default preferences the
    Prometheus reader's aggregation is pushed, and scrapes between pushes see each series once."""
    server, collector, port = await _metrics_collector()
    try:
        environ = {
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_METRIC_EXPORT_INTERVAL": "50",
        }
        telemetry = setup_telemetry("probe", environ=environ)
        try:
            readers = telemetry.meter_provider._metric_readers  # type: ignore[attr-defined]
            assert [type(reader).__name__ for reader in readers] == ["PushingPrometheusReader"]
            counter = telemetry.meter.create_counter("probe_calls")
            counter.add(2)
            await eventually(lambda: collector.exports >= 2, what="two pushes")
            counter.add(3)
            seen = collector.exports
            assert _scraped(telemetry, "probe_calls_total") == [5.0]
            # The push after the one that may have been on its way when 3 was added carries 5;
            # pushes go on after a scrape, and a scrape after pushes still sees the series once.
            await eventually(lambda: collector.exports >= seen + 2, what="two more pushes")
            assert _scraped(telemetry, "probe_calls_total") == [5.0]
            assert collector.last_sum("probe_calls") == 5.0
        finally:
            await asyncio.to_thread(telemetry.shutdown)
    finally:
        await server.stop(0)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "delta"),
        ("OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION", "base2_exponential_bucket_histogram"),
    ],
)
async def test_otlp_asking_for_other_aggregations_keeps_a_reader_of_its_own(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    # The OTLP exporter reads its preferences from the process environment.
    monkeypatch.setenv(variable, value)
    server, collector, port = await _metrics_collector()
    try:
        telemetry = setup_telemetry(
            "probe", environ={"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"http://127.0.0.1:{port}"}
        )
        readers = telemetry.meter_provider._metric_readers  # type: ignore[attr-defined]
        assert sorted(type(reader).__name__ for reader in readers) == [
            "PeriodicExportingMetricReader",
            "TallyingPrometheusReader",
        ]
        # Two readers, one of them delta or differently bucketed: the SDK's own instruments.
        counter = telemetry.meter.create_counter("probe_calls")
        assert not isinstance(counter, TallyCounter)
        counter.add(1)
        await asyncio.to_thread(telemetry.shutdown)
    finally:
        await server.stop(0)
    assert collector.exports > 0


@pytest.mark.parametrize("variable", ["OTEL_METRIC_EXPORT_INTERVAL", "OTEL_METRIC_EXPORT_TIMEOUT"])
@pytest.mark.parametrize("value", ["0", "soon", "-5"])
def test_a_bad_export_interval_or_timeout_is_refused_by_name(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        setup_telemetry(
            "probe", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", variable: value}
        )
