"""Calls between services of one process, handed to the callee's handler without a socket.

`ballast up` (and every suite the tests start) runs the five services in one process, each on
its own port, and each chat crosses up to seven calls between them. Over loopback TCP each call
costs both ends' gRPC core, HTTP/2 framing and event-loop wake-ups: about 40% of a session
chat's CPU in a profile of `ballast up`. A channel from `open_channel` to an address that this
very process serves (a loopback host and a port one of its servers listens on) now calls that
server's handler in-process. What a caller and a handler can observe stays as over the wire:

- each message is serialized and parsed again on the other side, so caller and handler share no
  objects, and a message over BALLAST_MAX_MESSAGE_BYTES fails with RESOURCE_EXHAUSTED;
- the server's interceptors run as for a network call (tracing, `rpc.server.call.duration`,
  error mapping, the edge's load shedding), and the caller gets CLIENT spans whose trace context
  the server's span continues, so a trace has the same shape (the context is handed over as an
  object on the servicer context, not written into the metadata as `traceparent` and parsed
  back; the server span's parent is then marked local, not remote). In a trace that is not
  kept, the CLIENT span nothing could see is not made (ClientSpans.start_local);
- the handler runs in a task of its own with a fresh `contextvars` context, so what it sets
  (the current span) never leaks into the caller;
- a timeout is a deadline: the handler sees it in `time_remaining()`, is cancelled when it
  passes, and the caller gets DEADLINE_EXCEEDED; a caller that is cancelled cancels the handler;
- statuses arrive as `grpc.aio.AioRpcError` with code, details and trailing metadata (the
  google.rpc details), and a server that is stopping stops taking calls, as its port does.

Only plaintext channels take this path: with mutual TLS configured, calls go through TLS so the
certificates are checked as configured. BALLAST_LOCAL_CALLS=false turns it off (every call over
the network, e.g. to watch the traffic between services with a packet capture).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from services.kit import tls
from services.kit.interceptors import AroundInterceptor
from services.kit.tracing import ClientSpans, HandedOver, TracedChannel, end_client_span

Metadata = tuple[tuple[str, str | bytes], ...]
Serializer = Callable[[Any], bytes] | None
Deserializer = Callable[[bytes], Any] | None

# Messages a stream's handler may run ahead of its reader: the in-process counterpart of
# HTTP/2's flow-control window, so a slow reader holds a fast handler back instead of letting
# its messages pile up in memory.
STREAM_WINDOW = 16


class _CallDetails:
    """grpc.HandlerCallDetails, as server interceptors receive it."""

    __slots__ = ("invocation_metadata", "method")

    def __init__(self, method: str, invocation_metadata: Metadata) -> None:
        self.method = method
        self.invocation_metadata = invocation_metadata


class LocalServer:
    """The method handlers one gRPC server serves and the interceptors it runs them in, so a
    call from this process can be handled as the server would handle it."""

    def __init__(self, interceptors: Sequence[grpc.aio.ServerInterceptor], max_message_bytes: int) -> None:
        self._interceptors = tuple(interceptors)
        # Interceptors that decide by the method alone (AroundInterceptor: tracing, metrics, the
        # edge's load shedding, error mapping) wrap a method's handler the same way on every call,
        # so the wrapped handler is kept per method instead of asked of each of them every time.
        self._method_only = all(isinstance(i, AroundInterceptor) for i in self._interceptors)
        self._resolved: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self._registered: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self._generic: list[grpc.GenericRpcHandler] = []
        self.max_message_bytes = max_message_bytes
        self._calls: set[asyncio.Task[Any]] = set()

    def recording(self, server: grpc.aio.Server) -> grpc.aio.Server:
        """`server` as the generated add_*_to_server functions see it: what they add is served on
        the port and noted here too."""
        return cast(grpc.aio.Server, _Recording(server, self))

    async def handler(self, method: str, metadata: Metadata) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The handler of `method` wrapped by the server's interceptors, or None if it has none."""
        resolved = self._resolved.get(method)
        if resolved is not None:
            return resolved
        handler = await self._intercepted(0, _CallDetails(method, metadata))
        if handler is not None and self._method_only:
            self._resolved[method] = handler
        return handler

    async def _intercepted(
        self, index: int, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        if index == len(self._interceptors):
            return self._find(details)
        continuation = functools.partial(self._intercepted, index + 1)
        return await self._interceptors[index].intercept_service(continuation, details)

    def _find(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        found = self._registered.get(details.method)
        if found is not None:
            return found
        for generic in self._generic:
            found = generic.service(details)
            if found is not None:
                return found
        return None

    def track(self, task: asyncio.Task[Any]) -> None:
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def drain(self, grace: float) -> None:
        """Lets the calls in progress finish within `grace`, then cancels the rest (as the
        server's own stop does with its calls)."""
        if not self._calls:
            return
        _, pending = await asyncio.wait(set(self._calls), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


class _Recording:
    """A server that also tells a LocalServer what is added to it."""

    def __init__(self, server: grpc.aio.Server, local: LocalServer) -> None:
        self._server = server
        self._local = local

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)
        self._local._generic.extend(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self._server.add_registered_method_handlers(service, handlers)
        self._local._registered.update({f"/{service}/{name}": h for name, h in handlers.items()})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


@dataclass(frozen=True)
class _Served:
    host: str
    server: LocalServer

    def reachable_from(self, host: str) -> bool:
        """Whether a client in this process dialling `host` at this port reaches this server."""
        if host == self.host:
            return True
        return tls.is_loopback(host) and (
            tls.is_loopback(self.host) or self.host in ("0.0.0.0", "::", "[::]", "")
        )


# The servers of this process that take in-process calls, by the port each listens on (a port
# has one listener: servers are started without SO_REUSEPORT).
_SERVED: dict[int, _Served] = {}


def serve(host: str, port: int, server: LocalServer) -> None:
    _SERVED[port] = _Served(host, server)


def withdraw(port: int, server: LocalServer) -> None:
    """Stops in-process calls to `server` (its port stops taking calls); later calls to that
    address go over the network and find what the port answers."""
    served = _SERVED.get(port)
    if served is not None and served.server is server:
        del _SERVED[port]


def _host_and_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a single host:port target; None for replica lists and resolver URIs."""
    if "," in address or address.startswith(("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")):
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _rpc_error(code: grpc.StatusCode, details: str, trailing: Metadata = ()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details)


class _RefusedError(Exception):
    """A status the in-process transport itself gives (no such method, a message too large),
    told apart from an AioRpcError that a handler lets out (which grpc answers as UNKNOWN)."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        super().__init__(error.details())
        self.error = error


class LocalContext(HandedOver):
    """The servicer context of an in-process call: what grpc.aio's gives a handler, and the
    caller's trace context (its CLIENT span) for the server's tracing."""

    __slots__ = ("_aborted", "_code", "_deadline", "_details", "_done", "_loop", "_metadata", "_trailing")

    def __init__(
        self,
        metadata: Metadata,
        deadline: float | None,
        loop: asyncio.AbstractEventLoop,
        trace_parent: otel_context.Context | None = None,
    ) -> None:
        super().__init__(trace_parent)
        self._metadata = metadata
        self._deadline = deadline
        self._loop = loop
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: Metadata = ()
        self._aborted = False
        self._done = False

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - self._loop.time())

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()) -> None:
        if self._aborted:
            raise grpc.aio.UsageError("Abort was already called!")
        self._aborted = True
        self._code = code
        self._details = details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> Metadata:
        return self._trailing

    async def send_initial_metadata(self, initial_metadata: Metadata) -> None:
        """Nothing reads initial metadata between services of one process."""

    def cancelled(self) -> bool:
        # A cancelled call cancels the handler's task: the handler sees CancelledError at once.
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0

    def done(self) -> bool:
        return self._done

    def peer(self) -> str:
        return "local"

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def set_compression(self, compression: grpc.Compression) -> None:
        """No compression in-process."""

    def disable_next_message_compression(self) -> None:
        """No compression in-process."""

    def error(self) -> grpc.aio.AioRpcError:
        code = self._code if self._code is not None else grpc.StatusCode.UNKNOWN
        return _rpc_error(code, self._details or "", self._trailing)


def _unexpected(exc: BaseException) -> grpc.aio.AioRpcError:
    # What grpc.aio's server answers for an exception a handler lets out.
    return _rpc_error(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}")


def _too_large(size: int, limit: int) -> _RefusedError:
    return _RefusedError(
        _rpc_error(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"Received message larger than max ({size} vs. {limit})"
        )
    )


def _deadline_exceeded() -> grpc.aio.AioRpcError:
    return _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


class _Call:
    """What unary and streaming in-process calls share: the handler's task, its deadline, its
    context (for the status) and the caller's CLIENT span."""

    def __init__(
        self,
        channel: LocalFirstChannel,
        server: LocalServer,
        method: str,
        request: bytes,
        timeout: float | None,
        metadata: Metadata,
        deserialize: Deserializer,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._server = server
        self._method = method
        self._deserialize = deserialize
        self._limit = min(channel.max_message_bytes, server.max_message_bytes)
        self._deadline = None if timeout is None else loop.time() + timeout
        spans = channel.spans
        # The handler's server span is the child of this CLIENT span, handed over as an object
        # rather than written into the metadata and parsed back (what a remote server would see:
        # the span and the caller's baggage). In a trace not kept no CLIENT span is made, and
        # the server's span continues the caller's (ClientSpans.start_local).
        self._span: trace.Span | None = None
        self._trace_parent: otel_context.Context | None = None
        if spans is not None:
            self._span, self._trace_parent = spans.start_local(method)
        self._metadata = metadata
        self._request = request
        self._status: grpc.aio.AioRpcError | None = None
        self._context: LocalContext | None = None
        # A fresh context: nothing the handler sets reaches the caller, and the caller's
        # current span reaches the handler only through its servicer context, as over the wire
        # through the metadata.
        self._task: asyncio.Task[Any] = loop.create_task(self._run(), context=contextvars.Context())
        self._task.add_done_callback(self._settled)
        server.track(self._task)

    async def _run(self) -> Any:
        raise NotImplementedError

    def _settled(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            # Possibly before the handler even started: the span still ends, as CANCELLED.
            if self._span is not None:
                self._finish(_rpc_error(grpc.StatusCode.CANCELLED, "Locally cancelled by application!"))
        else:
            # A call nobody awaited (its caller went away): its outcome is not an unhandled error.
            task.exception()

    async def _prepare(self) -> tuple[grpc.RpcMethodHandler[Any, Any], Any, LocalContext]:
        handler = await self._server.handler(self._method, self._metadata)
        if handler is None:
            raise _RefusedError(_rpc_error(grpc.StatusCode.UNIMPLEMENTED, "Method not found!"))
        if len(self._request) > self._limit:
            raise _too_large(len(self._request), self._limit)
        parse = handler.request_deserializer
        request = parse(self._request) if parse is not None else self._request
        self._context = LocalContext(self._metadata, self._deadline, self._loop, self._trace_parent)
        return handler, request, self._context

    def _response(self, handler: grpc.RpcMethodHandler[Any, Any], message: Any) -> Any:
        serialize = handler.response_serializer
        data = serialize(message) if serialize is not None else message
        if len(data) > self._limit:
            raise _too_large(len(data), self._limit)
        return self._deserialize(data) if self._deserialize is not None else data

    async def _guarded(self, work: Callable[[], Awaitable[Any]]) -> Any:
        """`work` under the call's deadline, every way it can end turned into the call's status."""
        timer = asyncio.timeout_at(self._deadline)
        try:
            async with timer:
                result = await work()
        except _RefusedError as refused:
            self._finish(refused.error)
            raise refused.error from None
        except grpc.aio.AbortError as exc:
            # Only a handler aborts, and it has a context by then.
            error = self._context.error() if self._context is not None else _unexpected(exc)
            self._finish(error)
            raise error from None
        except TimeoutError as exc:
            error = _deadline_exceeded() if timer.expired() else _unexpected(exc)
            self._finish(error)
            raise error from None
        except asyncio.CancelledError:
            self._finish(_rpc_error(grpc.StatusCode.CANCELLED, "Locally cancelled by application!"))
            raise
        except Exception as exc:
            error = _unexpected(exc)
            self._finish(error)
            raise error from None
        context = self._context
        if context is not None and context.code() not in (None, grpc.StatusCode.OK):
            error = context.error()
            self._finish(error)
            raise error
        self._finish(None)
        return result

    def _finish(self, error: grpc.aio.AioRpcError | None) -> None:
        self._status = error
        if self._context is not None:
            self._context._done = True
        if self._span is not None:
            if error is None:
                end_client_span(self._span, grpc.StatusCode.OK, None)
            else:
                end_client_span(self._span, error.code(), error.details())
            self._span = None

    # What grpc.aio's call objects offer besides the messages.

    def cancelled(self) -> bool:
        return self._task.cancelled()

    def done(self) -> bool:
        return self._task.done()

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - self._loop.time())

    def cancel(self) -> bool:
        return self._task.cancel()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._task.add_done_callback(lambda _: callback(self))

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata()

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        await asyncio.wait([self._task])
        if self._status is not None:
            return self._status.trailing_metadata()
        return grpc.aio.Metadata(*(self._context.trailing_metadata() if self._context is not None else ()))

    async def code(self) -> grpc.StatusCode:
        await asyncio.wait([self._task])
        if self._task.cancelled():
            return grpc.StatusCode.CANCELLED
        return grpc.StatusCode.OK if self._status is None else self._status.code()

    async def details(self) -> str:
        await asyncio.wait([self._task])
        return "" if self._status is None else self._status.details() or ""

    async def wait_for_connection(self) -> None:
        """In-process: always connected."""


class LocalUnaryCall(_Call, grpc.aio.UnaryUnaryCall[Any, Any]):
    async def _run(self) -> Any:
        async def work() -> Any:
            handler, request, context = await self._prepare()
            if handler.unary_unary is None:
                raise _RefusedError(_rpc_error(grpc.StatusCode.UNIMPLEMENTED, f"{self._method} is not unary"))
            behaviour = cast(
                "Callable[..., Awaitable[Any]]", handler.unary_unary
            )  # a string: not built per call
            return self._response(handler, await behaviour(request, context))

        return await self._guarded(work)

    def __await__(self) -> Generator[Any, None, Any]:
        return self._task.__await__()


_END = object()


class LocalStreamCall(_Call, grpc.aio.UnaryStreamCall[Any, Any]):
    """A server stream: the handler's task runs at most STREAM_WINDOW messages ahead."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._messages: asyncio.Queue[Any] = asyncio.Queue()
        self._window = asyncio.Semaphore(STREAM_WINDOW)
        super().__init__(*args, **kwargs)
        # However the handler's task ends (even cancelled before it started), readers see the end.
        self._task.add_done_callback(lambda _: self._messages.put_nowait(_END))

    async def _run(self) -> None:
        async def work() -> None:
            handler, request, context = await self._prepare()
            if handler.unary_stream is None:
                raise _RefusedError(
                    _rpc_error(grpc.StatusCode.UNIMPLEMENTED, f"{self._method} is not a stream")
                )
            behaviour = cast("Callable[..., AsyncGenerator[Any, None]]", handler.unary_stream)
            messages = behaviour(request, context)
            try:
                async for message in messages:
                    await self._window.acquire()
                    self._messages.put_nowait(self._response(handler, message))
            finally:
                # Cancelled while waiting for the reader: the handler's stream (and the
                # interceptors around it: its span, its duration) ends now, not when collected.
                await messages.aclose()

        await self._guarded(work)

    async def read(self) -> Any:
        if self._task.done() and self._messages.empty():
            return self._outcome()
        message = await self._messages.get()
        if message is _END:
            self._messages.put_nowait(_END)  # later reads see the end too
            return self._outcome()
        self._window.release()
        return message

    def _outcome(self) -> Any:
        if self._task.cancelled():
            raise asyncio.CancelledError()
        if self._status is not None:
            raise self._status
        return grpc.aio.EOF

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        try:
            while True:
                message = await self.read()
                if message is grpc.aio.EOF:
                    return
                yield message
        finally:
            # A reader that stops early (breaks out, or is cancelled) ends the call.
            self._task.cancel()

    def __del__(self) -> None:
        task = getattr(self, "_task", None)
        if task is not None and not task.done():
            task.cancel()


def _metadata(metadata: Any) -> Metadata:
    if not metadata:
        return ()
    return tuple((key, value) for key, value in metadata)


class _UnaryUnary(grpc.aio.UnaryUnaryMultiCallable[Any, Any]):
    # The in-process call this multi-callable makes when the callee is served by this process.
    _local_call: type[LocalUnaryCall] | type[LocalStreamCall] = LocalUnaryCall

    def __init__(
        self,
        channel: LocalFirstChannel,
        method: str,
        serialize: Serializer,
        deserialize: Deserializer,
        remote: Any,
    ) -> None:
        self._channel, self._method, self._serialize, self._deserialize = (
            channel,
            method,
            serialize,
            deserialize,
        )
        self._remote = remote

    def __call__(
        self, request: Any, *, timeout: float | None = None, metadata: Any = None, **options: Any
    ) -> Any:
        server = self._channel.local_server()
        if server is None:
            return self._remote(request, timeout=timeout, metadata=metadata, **options)
        data = self._serialize(request) if self._serialize is not None else request
        return self._local_call(
            self._channel, server, self._method, data, timeout, _metadata(metadata), self._deserialize
        )


class _UnaryStream(_UnaryUnary, grpc.aio.UnaryStreamMultiCallable[Any, Any]):
    _local_call = LocalStreamCall


class LocalFirstChannel(TracedChannel):
    """A channel that hands each call to the server of this process listening at its address,
    when there is one at the time of the call, and sends it over `remote` otherwise (traced as
    TracedChannel traces it)."""

    def __init__(
        self, address: str, remote: grpc.aio.Channel, max_message_bytes: int, spans: ClientSpans | None
    ) -> None:
        super().__init__(remote, spans)
        self._target = _host_and_port(address)
        self.max_message_bytes = max_message_bytes

    def local_server(self) -> LocalServer | None:
        if self._target is None:
            return None
        host, port = self._target
        served = _SERVED.get(port)
        if served is None or not served.reachable_from(host):
            return None
        return served.server

    def unary_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        **kw: Any,
    ) -> Any:
        remote = super().unary_unary(method, request_serializer, response_deserializer, **kw)
        return _UnaryUnary(self, method, request_serializer, response_deserializer, remote)

    def unary_stream(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        **kw: Any,
    ) -> Any:
        remote = super().unary_stream(method, request_serializer, response_deserializer, **kw)
        return _UnaryStream(self, method, request_serializer, response_deserializer, remote)
