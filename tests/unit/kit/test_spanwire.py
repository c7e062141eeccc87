"""The wire encoder writes exactly the request the OTLP library's own encoder builds."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from services.kit.spanwire import SpanEncoder


def _provider(name: str, exporter: InMemorySpanExporter, **kwargs: object) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": name}), **kwargs)  # type: ignore[arg-type]
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def _same(spans: tuple[ReadableSpan, ...] | list[ReadableSpan], encoder: SpanEncoder | None = None) -> None:
    ours = ExportTraceServiceRequest.FromString((encoder or SpanEncoder()).encode(spans))
    assert ours == encode_spans(spans)
    assert ours.resource_spans, "an empty request would compare equal to anything empty"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


def test_plain_rpc_spans_match_the_library(exporter: InMemorySpanExporter) -> None:
    tracer = _provider("ballast-edge", exporter).get_tracer("ballast.grpc")
    attributes = {"rpc.system": "grpc", "rpc.service": "ballast.edge.v1.EdgeService", "rpc.method": "Chat"}
    with tracer.start_as_current_span(
        "/ballast.edge.v1.EdgeService/Chat", kind=SpanKind.SERVER, attributes=attributes
    ):
        for code in (0, 5, 14):
            child = tracer.start_span("/ballast.limiter.v1.LimiterService/Check", kind=SpanKind.CLIENT)
            child.set_attribute("rpc.grpc.status_code", code)
            if code == 14:
                child.set_status(Status(StatusCode.ERROR, "StatusCode.UNAVAILABLE: router down"))
            child.end()
    spans = exporter.get_finished_spans()
    assert len(spans) == 4
    encoder = SpanEncoder()
    _same(spans, encoder)
    _same(spans, encoder)  # again, from the encodings it kept


def test_every_attribute_type_and_edge_value_matches(exporter: InMemorySpanExporter) -> None:
    tracer = _provider("ballast-cache", exporter).get_tracer("ballast")
    values: dict[str, Any] = {
        "zero": 0,
        "negative": -1,
        "most-negative": -(2**63),
        "large": 2**63 - 1,
        "false": False,
        "true": True,
        "float": 0.25,
        "float-zero": 0.0,
        "nan": float("nan"),
        "empty": "",
        "unicode": "ünïcødé ✓ 字",
        "long": "x" * 10_000,
        "strings": ["a", "b"],
        "ints": [1, -2, 3],
        "bools": [True, False],
        "floats": [1.5],
        "bytes": b"\x00\xff",
    }
    for kind in SpanKind:
        with tracer.start_as_current_span(f"every {kind.name}", kind=kind, attributes=values) as span:
            span.set_status(Status(StatusCode.OK))
    spans = exporter.get_finished_spans()
    ours = ExportTraceServiceRequest.FromString(SpanEncoder().encode(spans))
    theirs = encode_spans(spans)
    # NaN is unequal to itself in the parsed messages; compare the bytes of each span instead.
    assert [s.SerializeToString(deterministic=True) for s in ours.resource_spans[0].scope_spans[0].spans] == [
        s.SerializeToString(deterministic=True) for s in theirs.resource_spans[0].scope_spans[0].spans
    ]


def test_remote_parents_trace_state_events_links_and_dropped_counts_match(
    exporter: InMemorySpanExporter,
) -> None:
    limits = SpanLimits(max_span_attributes=2, max_events=1, max_links=1)
    tracer = _provider("ballast-router", exporter, span_limits=limits).get_tracer(
        "ballast", schema_url="https://x/1"
    )
    remote = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "a1"), ("other", "b2")]),
    )
    parent = trace.set_span_in_context(trace.NonRecordingSpan(remote))
    with tracer.start_as_current_span("served", context=parent, kind=SpanKind.SERVER) as span:
        for i in range(4):
            span.set_attribute(f"attribute.{i}", i)
    with tracer.start_as_current_span(
        "linked", links=[Link(remote, {"why": "batch"}), Link(remote)], attributes={"a": 1}
    ) as span:
        span.add_event("first", {"n": 1})
        span.add_event("second")
    try:
        with tracer.start_as_current_span("failed"):
            raise ValueError("boom")
    except ValueError:
        pass
    spans = exporter.get_finished_spans()
    assert spans[0].dropped_attributes == 2 and spans[1].dropped_links == 1 and spans[1].dropped_events == 1
    assert spans[2].events, "record_exception should have added an event"
    _same(spans)


def test_spans_of_several_services_and_scopes_are_grouped_as_the_library_groups_them(
    exporter: InMemorySpanExporter,
) -> None:
    edge, limiter = _provider("ballast-edge", exporter), _provider("ballast-limiter", exporter)
    same_as_edge = _provider("ballast-edge", exporter)  # an equal resource: one group
    for provider, scope in ((edge, "a"), (limiter, "a"), (edge, "b"), (same_as_edge, "a"), (limiter, "b")):
        with provider.get_tracer(scope).start_as_current_span(f"{scope} work"):
            pass
    spans = exporter.get_finished_spans()
    _same(spans)
    request = ExportTraceServiceRequest.FromString(SpanEncoder().encode(spans))
    assert [len(group.scope_spans) for group in request.resource_spans] == [2, 2]


def test_a_value_no_encoder_can_write_is_left_out_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    class Unwritable:
        pass

    exporter = InMemorySpanExporter()
    tracer = _provider("ballast-edge", exporter).get_tracer("ballast")
    with tracer.start_as_current_span("work", attributes={"kept": 1}) as span:
        pass
    finished = exporter.get_finished_spans()[0]
    # The SDK refuses such values itself; a processor in between could still hand one on.
    finished._attributes = {"kept": 1, "odd": Unwritable()}  # type: ignore[dict-item]
    with caplog.at_level(logging.ERROR):
        request = ExportTraceServiceRequest.FromString(SpanEncoder().encode([finished]))
    assert [a.key for a in request.resource_spans[0].scope_spans[0].spans[0].attributes] == ["kept"]
    assert "odd" in caplog.text
    assert span is not None


def test_the_exporter_sends_the_encoding_to_a_collector_and_again_after_it_reconnects(
    exporter: InMemorySpanExporter,
) -> None:
    # The first export is refused UNAVAILABLE (retry at once), so the library reconnects and
    # builds its client again: the encoded bytes must reach the collector both ways.
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from google.protobuf.duration_pb2 import Duration
    from google.rpc.error_details_pb2 import RetryInfo
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
    from opentelemetry.sdk.trace.export import SpanExportResult

    from services.kit.spanwire import WireSpanExporter

    received: list[tuple[ExportTraceServiceRequest, dict[str, Any]]] = []
    refusals = [1]

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
            if refusals:
                refusals.pop()
                retry = RetryInfo(retry_delay=Duration(seconds=0)).SerializeToString()
                context.set_trailing_metadata((("google.rpc.retryinfo-bin", retry),))
                context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
            received.append((request, dict(context.invocation_metadata())))
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    tracer = _provider("ballast-cache", exporter).get_tracer("ballast.grpc")
    with tracer.start_as_current_span("/ballast.cache.v1.CacheService/Lookup", kind=SpanKind.SERVER) as span:
        span.set_attribute("rpc.grpc.status_code", 0)
    spans = exporter.get_finished_spans()
    wire = WireSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True, headers={"x-collector-key": "k1"})
    try:
        assert wire.export(spans) == SpanExportResult.SUCCESS
        assert wire.export(spans) == SpanExportResult.SUCCESS
    finally:
        wire.shutdown()
        server.stop(None)
    assert not refusals and len(received) == 2
    for request, metadata in received:
        assert request == encode_spans(spans)
        assert metadata["x-collector-key"] == "k1"
