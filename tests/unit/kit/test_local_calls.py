"""Calls between services of one process skip the socket (services/kit/local.py) and keep what
a caller and a handler can observe over the wire: deadlines, cancellation, statuses, size
limits, metadata, isolation of contexts, stream flow control, and a server that stops."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.kit import local
from services.kit.clients import open_channel
from services.kit.config import ServerSettings
from services.kit.interceptors import AroundInterceptor
from services.kit.net import free_port
from services.kit.server import RunningService, ServiceApp, start_service
from services.kit.telemetry import Telemetry, setup_telemetry
from tests.conftest import SuiteFactory
from tests.support.waiting import eventually

SERVICE = "ballast.test.v1.Local"
# A variable the handler sets: over the wire it could never reach the caller.
SEEN_BY = contextvars.ContextVar("SEEN_BY", default="caller")


class LocalApp(ServiceApp):
    """Handlers that report what they saw of their call."""

    name = "probe"

    def __init__(self, settings: ServerSettings, telemetry: Telemetry) -> None:
        super().__init__(settings, telemetry)
        self.hanging = asyncio.Event()
        self.hang_cancelled = asyncio.Event()
        self.streamed = 0
        self.stream_ended = asyncio.Event()

    def service_names(self) -> Sequence[str]:
        return [SERVICE]

    def register(self, server: grpc.aio.Server) -> None:
        async def remaining(request: bytes, context: Any) -> bytes:
            return repr(context.time_remaining()).encode()

        async def metadata(request: bytes, context: Any) -> bytes:
            value: str = dict(context.invocation_metadata()).get(request.decode(), "")
            return value.encode()

        async def baggage_of(request: bytes, context: Any) -> bytes:
            from opentelemetry import baggage

            return str(baggage.get_baggage(request.decode()) or "").encode()

        async def current_span(request: bytes, context: Any) -> bytes:
            from opentelemetry import trace

            span = trace.get_current_span()
            ids = span.get_span_context()
            return f"{ids.trace_id:032x} {ids.span_id:016x} {span.is_recording()}".encode()

        async def leak(request: bytes, context: Any) -> bytes:
            SEEN_BY.set("handler")
            return SEEN_BY.get().encode()

        async def echo(request: bytes, context: Any) -> bytes:
            return request * 2

        async def hang(request: bytes, context: Any) -> bytes:
            self.hanging.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.hang_cancelled.set()
                raise
            return b""

        async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
            try:
                for index in range(int(request.decode())):
                    self.streamed = index + 1
                    yield str(index).encode()
            finally:
                self.stream_ended.set()

        async def status(request: bytes, context: Any) -> bytes:
            context.set_trailing_metadata((("x-answer", "42"),))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not now")
            return b""

        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "Remaining": grpc.unary_unary_rpc_method_handler(remaining),
                        "Metadata": grpc.unary_unary_rpc_method_handler(metadata),
                        "Leak": grpc.unary_unary_rpc_method_handler(leak),
                        "Baggage": grpc.unary_unary_rpc_method_handler(baggage_of),
                        "Echo": grpc.unary_unary_rpc_method_handler(echo),
                        "Hang": grpc.unary_unary_rpc_method_handler(hang),
                        "Stream": grpc.unary_stream_rpc_method_handler(stream),
                        "Status": grpc.unary_unary_rpc_method_handler(status),
                        "CurrentSpan": grpc.unary_unary_rpc_method_handler(current_span),
                    },
                )
            ]
        )


def _app(**settings: Any) -> LocalApp:
    base = ServerSettings(service="probe", port=0, grace_period=5.0, max_message_bytes=64 * 1024)
    return LocalApp(
        replace(base, **settings), setup_telemetry("probe", environ={"OTEL_SDK_DISABLED": "true"})
    )


@pytest.fixture
async def served() -> AsyncIterator[tuple[LocalApp, RunningService, grpc.aio.Channel]]:
    app = _app()
    service = await start_service(app)
    channel = open_channel(service.address, app.server_settings, app.telemetry)
    assert isinstance(channel, local.LocalFirstChannel)
    yield app, service, channel
    await channel.close()
    await service.stop(0.1)


def _unary(channel: grpc.aio.Channel, name: str) -> Any:
    return channel.unary_unary(f"/{SERVICE}/{name}")


def _stream(channel: grpc.aio.Channel) -> Any:
    return channel.unary_stream(f"/{SERVICE}/Stream")


async def test_a_call_to_a_server_of_this_process_never_touches_the_socket(
    served: tuple[LocalApp, RunningService, grpc.aio.Channel],
) -> None:
    app, service, _ = served
    # The channel under it points at a port where nothing listens: only an in-process call answers.
    dead = grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}")
    channel = local.LocalFirstChannel(
        f"localhost:{service.port}", dead, app.server_settings.max_message_bytes, None
    )
    assert await _unary(channel, "Echo")(b"ab", timeout=30) == b"abab"
    await dead.close()


async def test_local_calls_off_or_tls_on_give_a_plain_channel(tmp_path: Path) -> None:
    app = _app()
    off = replace(app.server_settings, local_calls=False)
    assert not isinstance(open_channel("127.0.0.1:1", off, app.telemetry), local.LocalFirstChannel)
    service = await start_service(_app(local_calls=False))
    try:
        # A server told not to take in-process calls is reached over its port.
        channel = open_channel(service.address, app.server_settings, app.telemetry)
        assert isinstance(channel, local.LocalFirstChannel) and channel.local_server() is None
        assert await _unary(channel, "Echo")(b"x", timeout=30) == b"xx"
        await channel.close()
    finally:
        await service.stop(0.1)


async def test_suite_with_mutual_tls_calls_through_tls(suite_factory: SuiteFactory, tmp_path: Path) -> None:
    suite = await suite_factory(["limiter", "router"], tls_dir=tmp_path)
    router = suite.running["router"].app.server_settings
    assert router.client_tls is not None
    channel = open_channel(suite.address("limiter"), router, suite.running["router"].app.telemetry)
    assert not isinstance(channel, local.LocalFirstChannel)
    await channel.close()


async def test_the_deadline_reaches_the_handler_and_ends_the_call(
    served: tuple[LocalApp, RunningService, grpc.aio.Channel],
) -> None:
    app, _, channel = served
    remaining = float((await _unary(channel, "Remaining")(b"", timeout=30)).decode())
    assert 0 < remaining <= 30
    assert (await _unary(channel, "Remaining")(b"")).decode() == "None"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _unary(channel, "Hang")(b"", timeout=0.05)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The handler is cancelled, as a server cancels a call whose deadline passed.
    await asyncio.wait_for(app.hang_cancelled.wait(), 30)


async def test_a_cancelled_caller_cancels_the_handler(
    served: tuple[LocalApp, RunningService, grpc.aio.Channel],
) -> None:
    app, _, channel = served
    caller = asyncio.ensure_future(_unary(channel, "Hang")(b"", timeout=30))
    await asyncio.wait_for(app.hanging.wait(), 30)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.wait_for(app.hang_cancelled.wait(), 30)


async def test_what_the_handler_sets_stays_in_the_handler(
    served: tuple[LocalApp, RunningService, grpc.aio.Channel],
) -> None:
    _, _, channel = served
    assert await _unary(channel, "Leak")(b"", timeout=30) == b"handler"
    assert SEEN_BY.get() == "caller"


async def test_metadata_reaches_the_handler(
    served: tuple[LocalApp, RunningService, grpc.aio.Channel],
) -> None:
    _, _, channel = served
    reply = await _unary(channel, "Metadata")(b"x-tenant", timeout=30, metadata=(("x-tenant", "acme"),))
    assert reply == b"acme"


@contextlib.asynccontextmanager
async def _traced() -> AsyncIterator[tuple[grpc.aio.Channel, Any, Any]]:
    """A traced service of this process (the sampler as OTEL_TRACES_SAMPLER says), the
    in-process channel to it, a tracer of its provider and the exporter its spans reach."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry("probe", environ={}, extra_processors=[SimpleSpanProcessor(exporter)])
    settings = ServerSettings(service="probe", port=0, grace_period=5.0, max_message_bytes=64 * 1024)
    app = LocalApp(settings, telemetry)
    service = await start_service(app)
    channel = open_channel(service.address, app.server_settings, app.telemetry)
    assert isinstance(channel, local.LocalFirstChannel)
    try:
        yield channel, telemetry.tracer_provider.get_tracer("test"), exporter
    finally:
        await channel.close()
        await service.stop(0.1)


async def test_the_handlers_span_continues_the_callers_without_traceparent_text() -> None:
    from opentelemetry import baggage, trace
    from opentelemetry import context as otel_context

    async with _traced() as (channel, tracer, exporter):
        with tracer.start_as_current_span("caller") as caller:
            token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
            try:
                # The handler reads its metadata: an in-process call writes no trace context there.
                assert await _unary(channel, "Metadata")(b"traceparent", timeout=30) == b""
                assert await _unary(channel, "Baggage")(b"tenant", timeout=30) == b"acme"
            finally:
                otel_context.detach(token)
    spans = {(s.name, s.kind): s for s in exporter.get_finished_spans()}
    method = f"/{SERVICE}/Metadata"
    client, server = spans[method, trace.SpanKind.CLIENT], spans[method, trace.SpanKind.SERVER]
    assert client.parent is not None and client.parent.span_id == caller.get_span_context().span_id
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert server.context.trace_id == caller.get_span_context().trace_id
    # The parent is in this process: not marked remote, as a parent read off the wire is.
    assert not server.parent.is_remote


async def test_in_a_trace_not_kept_the_handlers_span_continues_the_callers_and_no_client_span_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ParentBased sampling keeps no trace here (its root sampler is always off) and drops every
    # child of an unsampled span: the CLIENT span of an in-process call could be seen by nothing
    # (not current, not sent, not recorded), so it is not made. The handler still gets a span of
    # its own in the caller's trace, not recorded, and what a recorded trace gets is unchanged.
    from services.kit.tracing import ClientSpans

    made: list[str] = []
    start = ClientSpans.start

    def counted(self: ClientSpans, method: str) -> Any:
        made.append(method)
        return start(self, method)

    monkeypatch.setattr(ClientSpans, "start", counted)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_off")
    async with _traced() as (channel, tracer, exporter):
        with tracer.start_as_current_span("caller") as caller:
            assert not caller.is_recording()
            seen = (await _unary(channel, "CurrentSpan")(b"", timeout=30)).decode()
            assert await _unary(channel, "Echo")(b"ab", timeout=30) == b"abab"
    trace_id, span_id, recording = seen.split()
    assert int(trace_id, 16) == caller.get_span_context().trace_id
    assert int(span_id, 16) not in (0, caller.get_span_context().span_id)
    assert recording == "False"
    assert made == []
    assert exporter.get_finished_spans() == ()


async def test_a_status_arrives_with_its_details_and_trailing_metadata(
    served: tuple[LocalApp, RunningService, grpc.aio.Channel],
) -> None:
    _, _, channel = served
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _unary(channel, "Status")(b"", timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == "not now"
    assert ("x-answer", "42") in list(info.value.trailing_metadata())
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await _unary(channel, "Nope")(b"", timeout=30)
    assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_messages_over_the_size_limit_are_refused_both_ways(
    served: tuple[LocalApp, RunningService, grpc.aio.Channel],
) -> None:
    app, _, channel = served
    limit = app.server_settings.max_message_bytes
    with pytest.raises(grpc.aio.AioRpcError) as request_too_large:
        await _unary(channel, "Echo")(b"x" * (limit + 1), timeout=30)
    assert request_too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Half the limit is accepted, and its doubled answer is not.
    with pytest.raises(grpc.aio.AioRpcError) as answer_too_large:
        await _unary(channel, "Echo")(b"x" * (limit // 2 + 1), timeout=30)
    assert answer_too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await _unary(channel, "Echo")(b"x" * (limit // 4), timeout=30) == b"x" * (limit // 2)


async def test_a_stream_runs_at_most_a_window_ahead_and_ends_when_its_reader_leaves(
    served: tuple[LocalApp, RunningService, grpc.aio.Channel],
) -> None:
    app, _, channel = served
    call = _stream(channel)(b"1000", timeout=30)
    messages = aiter(call)
    assert await anext(messages) == b"0"
    # The handler makes messages until the window is full, then waits for the reader.
    await eventually(lambda: app.streamed >= local.STREAM_WINDOW, what="the handler fills the window")
    for _ in range(20):
        await asyncio.sleep(0)
    assert app.streamed <= local.STREAM_WINDOW + 2
    await messages.aclose()
    # The handler's stream is closed then, not left for the garbage collector.
    await asyncio.wait_for(app.stream_ended.wait(), 30)
    app.stream_ended.clear()
    everything = [m async for m in _stream(channel)(b"50", timeout=30)]
    assert everything == [str(i).encode() for i in range(50)]
    assert app.stream_ended.is_set()


async def test_a_stopping_server_takes_no_more_in_process_calls(
    served: tuple[LocalApp, RunningService, grpc.aio.Channel],
) -> None:
    _, service, channel = served
    assert isinstance(channel, local.LocalFirstChannel) and channel.local_server() is not None
    await service.stop(0.1)
    assert channel.local_server() is None
    # Over the network the port is closed: the caller sees what a remote caller sees.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _unary(channel, "Echo")(b"x", timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


class _CountingAround(AroundInterceptor):
    """Asked for each method's handler by the interceptor chain; enters its context per call."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0
        self.entered = 0

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        self.asked += 1
        return await super().intercept_service(continuation, details)

    def around(self, method: str) -> Any:
        counter = self

        class Entered:
            def __init__(self, context: Any) -> None:
                pass

            async def __aenter__(self) -> None:
                counter.entered += 1

            async def __aexit__(self, *exc: object) -> None:
                return None

        return Entered


class _ByMetadata(grpc.aio.ServerInterceptor):
    """Decides per call from the call's metadata, as an authenticating interceptor would."""

    def __init__(self) -> None:
        self.asked = 0

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        self.asked += 1
        if dict(details.invocation_metadata or ()).get("x-refuse") == "yes":
            return None
        return await continuation(details)


def _local_server(*interceptors: grpc.aio.ServerInterceptor) -> local.LocalServer:
    server = local.LocalServer(interceptors, 1024)

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    server._generic.append(
        grpc.method_handlers_generic_handler(SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    )
    return server


async def test_interceptors_that_decide_by_method_are_asked_once_and_still_run_around_every_call() -> None:
    around = _CountingAround()
    server = _local_server(around)
    method = f"/{SERVICE}/Echo"
    for _ in range(3):
        handler = await server.handler(method, ())
        assert handler is not None and handler.unary_unary is not None
        # Under grpc.aio a unary behaviour is a coroutine function; the stubs describe the sync API.
        behaviour: Any = handler.unary_unary
        assert await behaviour(b"x", None) == b"x"
    assert (around.asked, around.entered) == (1, 3)
    assert await server.handler(f"/{SERVICE}/Missing", ()) is None


async def test_an_interceptor_that_reads_each_calls_metadata_is_asked_on_every_call() -> None:
    around, by_metadata = _CountingAround(), _ByMetadata()
    server = _local_server(around, by_metadata)
    method = f"/{SERVICE}/Echo"
    assert await server.handler(method, ()) is not None
    assert await server.handler(method, (("x-refuse", "yes"),)) is None
    assert await server.handler(method, ()) is not None
    assert by_metadata.asked == 3
