"""The kit's gRPC tracing: a CLIENT span per call made and a SERVER span per call handled, one
trace across, statuses by the RPC conventions, health checks left out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from services.kit.interceptors import Context
from services.kit.tracing import ClientSpans, ServerTracing, TracedChannel


def _handlers() -> grpc.GenericRpcHandler:
    async def echo(request: bytes, context: Context) -> bytes:
        return request

    async def missing(request: bytes, context: Context) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        raise AssertionError("abort raises")

    async def down(request: bytes, context: Context) -> bytes:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the store is down")
        raise AssertionError("abort raises")

    async def count(request: bytes, context: Context) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()

    return grpc.method_handlers_generic_handler(
        "t.T",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Missing": grpc.unary_unary_rpc_method_handler(missing),
            "Down": grpc.unary_unary_rpc_method_handler(down),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        },
    )


def _one(spans: list[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    (span,) = [s for s in spans if s.name == name and s.kind == kind]
    return span


def _recorded(sampler: Any = None) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@contextlib.asynccontextmanager
async def _traced_channel(
    provider: TracerProvider, handlers: grpc.GenericRpcHandler, *, traced_server: bool = True
) -> AsyncIterator[TracedChannel]:
    """A TracedChannel to a server of `handlers` (with its tracing, unless told otherwise)."""
    server = grpc.aio.server(interceptors=[ServerTracing(provider)] if traced_server else [])
    server.add_generic_rpc_handlers([handlers])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with TracedChannel(
            grpc.aio.insecure_channel(f"127.0.0.1:{port}"), ClientSpans(provider)
        ) as channel:
            yield channel
    finally:
        await server.stop(None)


async def test_client_and_server_spans_form_one_trace_with_their_statuses() -> None:
    provider, exporter = _recorded()
    async with _traced_channel(provider, _handlers()) as channel:
        echo: Any = channel.unary_unary("/t.T/Echo")
        missing: Any = channel.unary_unary("/t.T/Missing")
        down: Any = channel.unary_unary("/t.T/Down")
        count: Any = channel.unary_stream("/t.T/Count")
        with provider.get_tracer("test").start_as_current_span("request") as root:
            assert await echo(b"hi") == b"hi"
            for call, code in ((missing, grpc.StatusCode.NOT_FOUND), (down, grpc.StatusCode.UNAVAILABLE)):
                try:
                    await call(b"x")
                except grpc.aio.AioRpcError as error:
                    assert error.code() == code
                else:
                    raise AssertionError("the call should have failed")
            assert [m async for m in count(b"3")] == [b"0", b"1", b"2"]
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    spans = list(exporter.get_finished_spans())
    trace_id = root.get_span_context().trace_id
    by_id = {s.context.span_id: s for s in spans if s.context is not None}
    for name in ("/t.T/Echo", "/t.T/Missing", "/t.T/Down", "/t.T/Count"):
        client = _one(spans, name, SpanKind.CLIENT)
        served = _one(spans, name, SpanKind.SERVER)
        # The server span is the child of the client span, which is the child of the caller's span.
        assert client.context is not None and client.context.trace_id == trace_id
        assert client.parent is not None and client.parent.span_id == root.get_span_context().span_id
        assert served.parent is not None and by_id[served.parent.span_id] is client
        attributes = dict(served.attributes or {})
        assert attributes["rpc.system"] == "grpc"
        assert (attributes["rpc.service"], attributes["rpc.method"]) == ("t.T", name.rsplit("/", 1)[1])
    codes = {
        (s.name, s.kind): (dict(s.attributes or {})["rpc.grpc.status_code"], s.status.status_code)
        for s in spans
        if s.name.startswith("/t.T/")
    }
    assert codes[("/t.T/Echo", SpanKind.SERVER)] == (0, StatusCode.UNSET)
    assert codes[("/t.T/Count", SpanKind.CLIENT)] == (0, StatusCode.UNSET)
    # A NOT_FOUND is the server doing its job; the caller did not get what it asked for.
    assert codes[("/t.T/Missing", SpanKind.SERVER)] == (5, StatusCode.UNSET)
    assert codes[("/t.T/Missing", SpanKind.CLIENT)] == (5, StatusCode.ERROR)
    assert codes[("/t.T/Down", SpanKind.SERVER)] == (14, StatusCode.ERROR)
    assert codes[("/t.T/Down", SpanKind.CLIENT)] == (14, StatusCode.ERROR)
    # Health checks are not traced on the server (Ballast's own clients never make them).
    assert not [s for s in spans if s.name.startswith("/grpc.health") and s.kind == SpanKind.SERVER]


def test_a_caller_without_trace_context_starts_a_root_and_one_with_it_continues() -> None:
    from opentelemetry import baggage, trace

    from services.kit.tracing import _extracted

    untraced = _extracted((("x-api-key", "k"), ("user-agent", "grpc-go")))
    assert not trace.get_current_span(untraced).get_span_context().is_valid
    assert _extracted(()) == _extracted(None)
    traced = _extracted((("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),))
    parent = trace.get_current_span(traced).get_span_context()
    assert parent.trace_id == 0x0AF7651916CD43DD8448EB211C80319C and parent.is_remote
    assert baggage.get_baggage("tenant", _extracted((("baggage", "tenant=acme"),))) == "acme"


def test_other_propagators_always_read_the_metadata() -> None:
    # A propagator may read headers its `fields` do not name: with any but the W3C ones, every
    # call's metadata goes through them.
    from opentelemetry import context as otel_context
    from opentelemetry import propagate
    from opentelemetry.propagators.textmap import TextMapPropagator

    from services.kit.tracing import _extracted

    class Prefixed(TextMapPropagator):
        def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> otel_context.Context:
            found = {k: v for k, v in carrier.items() if k.startswith("ctx-")}
            return otel_context.set_value("prefixed", found, context)

        def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:
            return None

        @property
        def fields(self) -> set[str]:
            return set()

    saved = propagate.get_global_textmap()
    propagate.set_global_textmap(Prefixed())
    try:
        extracted = _extracted((("ctx-user", "7"),))
    finally:
        propagate.set_global_textmap(saved)
    assert otel_context.get_value("prefixed", extracted) == {"ctx-user": "7"}


async def test_a_call_in_a_trace_not_kept_still_carries_the_decision_and_is_the_channels_own() -> None:
    # The caller's trace is not sampled: its CLIENT span records nothing, so the call goes back
    # to the caller unwrapped, and the server still gets the trace context (flags without the
    # sampled bit), so it keeps nothing either instead of deciding afresh. The caller's own
    # metadata reaches the server, and a traceparent it set itself is replaced, not sent twice.
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    seen: list[tuple[tuple[str, str | bytes], ...]] = []
    current: list[trace.Span] = []

    async def echo(request: bytes, context: Context) -> bytes:
        seen.append(tuple(context.invocation_metadata() or ()))
        current.append(trace.get_current_span())  # the server's span of the trace not kept
        return request

    provider, exporter = _recorded(ParentBased(ALWAYS_OFF))
    handlers = grpc.method_handlers_generic_handler(
        "t.T", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    async with _traced_channel(provider, handlers) as channel:
        echo_call: Any = channel.unary_unary("/t.T/Echo")
        with provider.get_tracer("test").start_as_current_span("request") as root:
            assert not root.is_recording()
            call = echo_call(b"hi", metadata=(("x-tenant", "acme"), ("traceparent", "forged")))
            assert isinstance(call, grpc.aio.UnaryUnaryCall)
            assert await call == b"hi"
    assert exporter.get_finished_spans() == ()
    (metadata,) = seen
    assert ("x-tenant", "acme") in metadata
    (traceparent,) = [value for key, value in metadata if key == "traceparent"]
    version, trace_id, _, flags = str(traceparent).split("-")
    assert version == "00" and not int(flags, 16) & 0x01  # not sampled
    assert int(trace_id, 16) == root.get_span_context().trace_id
    (server_span,) = current
    assert not server_span.is_recording()
    assert server_span.get_span_context().trace_id == root.get_span_context().trace_id
    assert server_span.get_span_context().span_id not in (0, root.get_span_context().span_id)


@pytest.mark.parametrize(
    ("caller", "local_unsampled_children", "made"),
    [
        ("kept", "dropped", "recorded"),  # a trace kept: the CLIENT span is made and recorded
        ("not kept", "dropped", "none"),  # children fixed not recorded: no span is made
        ("not kept", "recorded", "recorded"),  # a sampler that records them: the span is made
        # A caller's span read off the wire, unsampled: the CLIENT span would be dropped as the
        # child of a remote parent, but its own child, the server's span, recorded as the child
        # of a local one. The CLIENT span is made, so the server's span gets that decision.
        ("remote, not kept", "recorded", "not recorded"),
    ],
)
def test_an_in_process_calls_client_span_is_made_unless_nothing_could_see_it(
    caller: str, local_unsampled_children: str, made: str
) -> None:
    from opentelemetry import context as otel_context
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
    from opentelemetry.trace.propagation import _SPAN_KEY

    children = ALWAYS_ON if local_unsampled_children == "recorded" else ALWAYS_OFF
    sampler = ParentBased(ALWAYS_ON if caller == "kept" else ALWAYS_OFF, local_parent_not_sampled=children)
    provider, exporter = _recorded(sampler)
    spans = ClientSpans(provider)
    with contextlib.ExitStack() as stack:
        if caller.startswith("remote"):
            remote = SpanContext(0x1F, 0x2F, is_remote=True, trace_flags=TraceFlags(TraceFlags.DEFAULT))
            token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(remote)))
            stack.callback(otel_context.detach, token)
        else:
            stack.enter_context(provider.get_tracer("test").start_as_current_span("caller"))
        current = otel_context.get_current()
        calling = trace.get_current_span()
        span, handed_over = spans.start_local("/t.T/Echo")
    if made == "none":
        assert span is None
        assert handed_over is current  # the server's span continues the caller's
        return
    assert span is not None and span.is_recording() == (made == "recorded")
    assert handed_over.get(_SPAN_KEY) is span
    assert span.get_span_context().trace_id == calling.get_span_context().trace_id
    if made == "recorded":
        span.end()
        (client,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
        assert client.parent is not None
        assert client.parent.span_id == calling.get_span_context().span_id


async def test_a_recorded_call_ends_its_span_once_however_often_it_is_awaited_or_if_refused() -> None:
    provider, exporter = _recorded()
    async with _traced_channel(provider, _handlers(), traced_server=False) as channel:
        echo: Any = channel.unary_unary("/t.T/Echo")
        count: Any = channel.unary_stream("/t.T/Count")
        call = echo(b"again")
        assert await call == b"again"
        assert await call == b"again"
        assert await call.code() == grpc.StatusCode.OK
        stream = count(b"2")
        assert [await stream.read(), await stream.read()] == [b"0", b"1"]
        assert await stream.read() is grpc.aio.EOF
        with pytest.raises(TypeError):
            echo(b"refused", metadata=42)  # refused before it starts: its span ends all the same
    ended = [(s.name, s.kind, s.status.status_code) for s in exporter.get_finished_spans()]
    assert ended == [
        ("/t.T/Echo", SpanKind.CLIENT, StatusCode.UNSET),
        ("/t.T/Count", SpanKind.CLIENT, StatusCode.UNSET),
        ("/t.T/Echo", SpanKind.CLIENT, StatusCode.ERROR),
    ]
