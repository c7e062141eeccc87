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
from opentelemetry.sdk.trace import sampling as samplers
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from services.kit import spanwire
from services.kit.spanwire import QueuingSpanProcessor, SpanEncoder
from services.kit.tracing import PlainAttributes, RpcSpan, RpcTracer


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


def test_rpc_spans_are_encoded_from_the_attributes_they_keep(exporter: InMemorySpanExporter) -> None:
    # RpcSpans as the services make them: the method's starting attributes shared, the status
    # code and the edge's attributes set after. The encoder reads them without making the span's
    # BoundedAttributes; the library's encoder (which reads span.attributes, and so makes them)
    # must find the same request.
    provider = _provider("ballast-edge", exporter, span_limits=SpanLimits(max_span_attributes=6))
    tracer = RpcTracer(provider)
    chat = PlainAttributes(
        {"rpc.system": "grpc", "rpc.service": "ballast.edge.v1.EdgeService", "rpc.method": "Chat"}
    )
    check = PlainAttributes(
        {"rpc.system": "grpc", "rpc.service": "ballast.limiter.v1.LimiterService", "rpc.method": "Check"}
    )
    server = tracer.start("/ballast.edge.v1.EdgeService/Chat", None, SpanKind.SERVER, chat)
    context = trace.set_span_in_context(server)
    for code in (0, 8):
        client = tracer.start("/ballast.limiter.v1.LimiterService/Check", context, SpanKind.CLIENT, check)
        client.set_attribute("rpc.grpc.status_code", code)
        client.end()
    server.set_attributes({"ballast.tenant": "acme", "ballast.cache": "hit"})
    server.set_attribute("ballast.tenant", "acme2")  # set again: moves to the end
    server.set_attribute("rpc.grpc.status_code", 0)
    server.end()
    # Past the count limit (6): made and cut as the SDK cuts, and then read as made.
    crowded = tracer.start("/ballast.limiter.v1.LimiterService/Check", context, SpanKind.CLIENT, check)
    crowded.set_attributes({"a": 1, "b": 2, "c": 3, "d": 4})
    crowded.end()
    spans = [span for span in exporter.get_finished_spans() if isinstance(span, RpcSpan)]
    assert len(spans) == 4
    assert [span.unmade_attributes() is not None for span in spans] == [True, True, True, False]
    unmade = spans[2].unmade_attributes()
    assert unmade is not None
    starting, added = unmade
    assert starting is chat and added == {
        "ballast.cache": "hit",
        "ballast.tenant": "acme2",
        "rpc.grpc.status_code": 0,
    }
    encoder = SpanEncoder()
    ours = ExportTraceServiceRequest.FromString(encoder.encode(spans))
    again = ExportTraceServiceRequest.FromString(encoder.encode(spans))  # from the encodings it kept
    assert [span.unmade_attributes() is not None for span in spans] == [True, True, True, False]
    assert ours == again == encode_spans(spans)  # the library's encoder makes the attributes
    assert all(span.unmade_attributes() is None for span in spans)
    assert list(spans[2].attributes.items())[-3:] == [  # type: ignore[union-attr]
        ("ballast.cache", "hit"),
        ("ballast.tenant", "acme2"),
        ("rpc.grpc.status_code", 0),
    ]
    assert ExportTraceServiceRequest.FromString(SpanEncoder().encode(spans)) == ours
    assert spans[3].dropped_attributes == 1


class _RecordingAll(samplers.Sampler):
    """Records every span and samples every other trace: the unsampled spans still end and reach
    the processors, which must not export them."""

    def should_sample(
        self, parent_context: Any, trace_id: int, *args: Any, **kwargs: Any
    ) -> samplers.SamplingResult:
        keep = trace_id % 2 == 0
        return samplers.SamplingResult(
            samplers.Decision.RECORD_AND_SAMPLE if keep else samplers.Decision.RECORD_ONLY
        )

    def get_description(self) -> str:
        return "RecordingAll"


def _queuing(**kwargs: Any) -> tuple[TracerProvider, QueuingSpanProcessor, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    processor = QueuingSpanProcessor(exporter, schedule_delay_millis=3_600_000, **kwargs)
    provider = TracerProvider(sampler=_RecordingAll())
    provider.add_span_processor(processor)
    return provider, processor, exporter


def test_the_queuing_processor_exports_the_sampled_spans_in_order() -> None:
    provider, processor, exporter = _queuing()
    tracer = RpcTracer(provider)
    attributes = PlainAttributes({"rpc.system": "grpc"})
    made = [tracer.start(f"m{i}", None, SpanKind.SERVER, attributes) for i in range(60)]
    for span in made:
        span.end()
    sampled: list[Any] = [span for span in made if span.get_span_context().trace_flags.sampled]
    assert all(span.is_recording() is False for span in made)  # ended
    assert 0 < len(sampled) < len(made)  # both kinds, so the test shows the unsampled are left out
    assert processor.force_flush()
    assert list(exporter.get_finished_spans()) == sampled
    processor.shutdown()  # type: ignore[no-untyped-call]


def test_a_full_queue_and_a_shut_processor_are_the_sdks_to_handle(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider, processor, exporter = _queuing(max_queue_size=4, max_export_batch_size=4)
    # The worker sleeps for an hour unless a full batch wakes it: kept asleep, so the queue stays
    # full and no thread races the test (force_flush exports in the caller's thread).
    monkeypatch.setattr(processor._batch_processor._worker_awaken, "set", lambda: None)
    tracer = provider.get_tracer("t")
    with caplog.at_level(logging.WARNING):
        for _ in range(6):
            tracer.start_span("x", context=_SAMPLED).end()
    assert "Queue full" in caplog.text  # the SDK's emit drops and says so
    assert processor.force_flush()
    assert len(exporter.get_finished_spans()) == 4
    monkeypatch.undo()  # shutdown wakes the worker to stop it
    processor.shutdown()  # type: ignore[no-untyped-call]
    tracer.start_span("late", context=_SAMPLED).end()
    assert len(exporter.get_finished_spans()) == 4


def test_a_full_batch_wakes_the_worker_and_a_fork_goes_through_the_sdk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    provider, processor, exporter = _queuing(max_queue_size=64, max_export_batch_size=3)
    tracer = provider.get_tracer("t")
    batch = processor._batch_processor
    # The worker sleeps for an hour unless a full batch wakes it: the wake-ups are counted here,
    # in the test's own thread, instead of waiting for the worker.
    wakes: list[None] = []
    monkeypatch.setattr(batch._worker_awaken, "set", lambda: wakes.append(None))
    for count in range(1, 4):
        tracer.start_span("x", context=_SAMPLED).end()
        assert len(wakes) == (1 if count == 3 else 0)
    assert len(batch._queue) == 3 and exporter.get_finished_spans() == ()
    monkeypatch.undo()
    emitted: list[Any] = []
    monkeypatch.setattr(batch, "emit", emitted.append)
    tracer.start_span("here", context=_SAMPLED).end()
    assert emitted == []
    monkeypatch.setattr(spanwire, "_process_id", -1)  # as in a forked child before its hook ran
    tracer.start_span("forked", context=_SAMPLED).end()
    assert [span.name for span in emitted] == ["forked"]
    processor.shutdown()  # type: ignore[no-untyped-call]


_SAMPLED = trace.set_span_in_context(trace.NonRecordingSpan(SpanContext(0x12, 0x34, True, TraceFlags(1))))
