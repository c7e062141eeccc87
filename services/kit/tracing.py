"""gRPC tracing interceptors: a SERVER span for every call a service handles, a CLIENT span for
every call it makes, W3C trace context (the configured propagators) carried in the metadata, and
the RPC semantic-convention attributes (`rpc.system`, `rpc.service`, `rpc.method`,
`rpc.grpc.status_code`). Health checks and reflection are left out of traces.

The interceptors of opentelemetry-instrumentation-grpc did the same with more work on every
call: a proxy object around each servicer context, the method handler rebuilt per call, the
metadata copied into a dict to read the user agent, the peer address parsed, a done-callback
and two awaits per client call. Here a method's handler is wrapped once (AroundInterceptor), its
attributes are built once, and the status comes from the context when the call ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.kit.interceptors import Around, AroundInterceptor, Context

INSTRUMENTATION = "ballast.grpc"
_UNTRACED = ("/grpc.health.", "/grpc.reflection.")
# A server span is an error only for these codes (the RPC conventions): a NOT_FOUND or an
# INVALID_ARGUMENT is the server doing its job.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_STATUS_CODE = "rpc.grpc.status_code"


def _attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


class ServerTracing(AroundInterceptor):
    """One SERVER span per handled call, the child of the caller's span when it sent one."""

    def __init__(self, tracer_provider: trace.TracerProvider) -> None:
        super().__init__()
        self._tracer = tracer_provider.get_tracer(INSTRUMENTATION)

    def around(self, method: str) -> Around | None:
        if method.startswith(_UNTRACED):
            return None
        tracer = self._tracer
        attributes = _attributes(method)

        class Traced:
            # A plain class, as MetricsInterceptor's: this runs around every call.
            __slots__ = ("context", "span", "token")

            def __init__(self, context: Context) -> None:
                self.context = context

            async def __aenter__(self) -> None:
                metadata = self.context.invocation_metadata()
                parent = propagate.extract(dict(metadata) if metadata else {})
                span = tracer.start_span(method, parent, SpanKind.SERVER, attributes)
                self.span = span
                self.token = otel_context.attach(trace.set_span_in_context(span, parent))

            async def __aexit__(self, kind: type[BaseException] | None, exc: object, tb: object) -> None:
                span, context = self.span, self.context
                try:
                    code = context.code()
                    if kind is not None and not code:
                        # Not an abort with a status: a client that went away, or a bug.
                        if issubclass(kind, asyncio.CancelledError) or context.cancelled():
                            code = grpc.StatusCode.CANCELLED
                        else:
                            code = grpc.StatusCode.UNKNOWN
                            if isinstance(exc, Exception):
                                span.record_exception(exc)
                    code = code or grpc.StatusCode.OK
                    span.set_attribute(_STATUS_CODE, code.value[0])
                    if code in _SERVER_ERRORS:
                        span.set_status(Status(StatusCode.ERROR, f"{code}:{context.details() or ''}"))
                finally:
                    otel_context.detach(self.token)
                    span.end()

        return Traced


def _client_details(details: grpc.aio.ClientCallDetails, span: trace.Span) -> grpc.aio.ClientCallDetails:
    """The call's details with the trace context of `span` in its metadata."""
    metadata = grpc.aio.Metadata(*details.metadata) if details.metadata else grpc.aio.Metadata()
    propagate.inject(metadata, context=trace.set_span_in_context(span))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


def end_client_span(span: trace.Span, code: grpc.StatusCode, details: str | None) -> None:
    """Ends a CLIENT span with the call's status (an error for every code but OK)."""
    span.set_attribute(_STATUS_CODE, code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, details or code.name))
    span.end()


class ClientSpans:
    """Starts the CLIENT span of a call this service makes, the child of the current span (the
    call being handled). Used by the channels' interceptors and by in-process calls
    (services/kit/local.py), so a trace looks the same whichever way a call travelled."""

    def __init__(self, tracer_provider: trace.TracerProvider) -> None:
        self._tracer = tracer_provider.get_tracer(INSTRUMENTATION)
        self._attributes: dict[str, dict[str, str]] = {}

    def start(self, method: str) -> trace.Span:
        attributes = self._attributes.get(method)
        if attributes is None:
            attributes = self._attributes[method] = _attributes(method)
        return self._tracer.start_span(method, kind=SpanKind.CLIENT, attributes=attributes)


class _ClientTracing:
    def __init__(self, tracer_provider: trace.TracerProvider) -> None:
        self._spans = ClientSpans(tracer_provider)

    def _start(self, details: grpc.aio.ClientCallDetails) -> tuple[trace.Span, grpc.aio.ClientCallDetails]:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        span = self._spans.start(method)
        return span, _client_details(details, span)


class UnaryClientTracing(_ClientTracing, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        span, details = self._start(client_call_details)
        try:
            call = await continuation(details, request)
            code = await call.code()
        except grpc.aio.AioRpcError as error:
            end_client_span(span, error.code(), error.details())
            raise
        except BaseException as error:
            # Cancelled by the caller, or a failure before any status.
            end_client_span(span, grpc.StatusCode.CANCELLED, type(error).__name__)
            raise
        end_client_span(span, code, None if code == grpc.StatusCode.OK else await call.details())
        return call


class StreamClientTracing(_ClientTracing, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        span, details = self._start(client_call_details)
        try:
            call = await continuation(details, request)
        except BaseException as error:
            code = error.code() if isinstance(error, grpc.aio.AioRpcError) else grpc.StatusCode.CANCELLED
            end_client_span(span, code, type(error).__name__)
            raise
        return _relay(span, call)


async def _relay(span: trace.Span, call: Any) -> AsyncIterator[Any]:
    """The stream's messages; the span ends with the stream."""
    code, details = grpc.StatusCode.OK, None
    try:
        async for message in call:
            yield message
    except grpc.aio.AioRpcError as error:
        code, details = error.code(), error.details()
        raise
    except BaseException as error:
        code, details = grpc.StatusCode.CANCELLED, type(error).__name__
        raise
    finally:
        end_client_span(span, code, details)


def client_interceptors(tracer_provider: trace.TracerProvider) -> list[Any]:
    return [UnaryClientTracing(tracer_provider), StreamClientTracing(tracer_provider)]
