"""The edge's OpenAI-compatible HTTP face: /v1/chat/completions, /v1/models, /v1/embeddings.

A lean ASGI app on uvicorn (httptools parser), served from the edge's own event loop next to
the gRPC server. It only translates: a chat turn runs through the very same
`EdgeServicer.chat`/`chat_stream` as `EdgeService/Chat` (keys, validation, pacing, limits,
sessions, cache, router, metrics); errors become OpenAI's envelope with the HTTP status the
SDKs act on. Request bodies are bounded (BALLAST_EDGE_HTTP_MAX_BODY_BYTES) and every request has
a deadline (BALLAST_EDGE_HTTP_REQUEST_TIMEOUT).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import uvicorn
from ballast.router.v1 import router_pb2
from opentelemetry import propagate, trace

from services.edge import openai_format as fmt
from services.edge.config import EdgeSettings
from services.edge.downstream import Deadline, Downstream
from services.edge.edge import new_request_id
from services.edge.embeddings import embed
from services.edge.servicer import EdgeServicer, InFlightLimit, KeyRegistry
from services.edge.settlement import Settler
from services.kit.errors import BallastError, InvalidArgument, ResourceExhausted, Unavailable
from services.kit.telemetry import Telemetry

log = logging.getLogger("ballast.edge.http")
# uvicorn's own start and stop lines repeat the edge's in another shape; its warnings still show.
logging.getLogger("uvicorn.error").setLevel(logging.WARNING)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # Proxies (nginx) must pass each event on at once instead of buffering the stream.
    (b"x-accel-buffering", b"no"),
]
_ROUTES = {
    "/v1/chat/completions": ("POST", "chat"),
    "/v1/embeddings": ("POST", "embeddings"),
    "/v1/models": ("GET", "models"),
}
_MODEL_PREFIX = "/v1/models/"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class _ReplyError(Exception):
    """Ends a request early with this answer (an error found before the pipeline ran)."""

    def __init__(self, error: fmt.HttpError) -> None:
        super().__init__(error.status)
        self.error = error


class OpenAIHttpApp:
    """The ASGI application. One instance per edge; holds no per-request state."""

    def __init__(
        self,
        settings: EdgeSettings,
        keys: KeyRegistry,
        servicer: EdgeServicer,
        downstream: Downstream,
        in_flight: InFlightLimit,
        telemetry: Telemetry,
        settler: Settler | None = None,
    ) -> None:
        self._settler = settler
        self._settings = settings
        self._keys = keys
        self._servicer = servicer
        self._down = downstream
        self._in_flight = in_flight
        self._tracer = telemetry.tracer if telemetry.tracing else None
        self._duration = telemetry.meter.create_histogram(
            "http.server.request.duration",
            unit="s",
            description="Duration of OpenAI-compatible HTTP requests handled, by route and status",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        started = time.perf_counter()
        path: str = scope["path"]
        method: str = scope["method"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        route, handler = self._route(method, path)
        scope["ballast.started"] = started
        status = 500
        with self._span(method, route, headers) as span:
            try:
                status = await self._admitted(handler, scope, headers, receive, send)
            finally:
                if span is not None:
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(trace.StatusCode.ERROR)
                self._duration.record(
                    time.perf_counter() - started,
                    {"http.request.method": method, "http.route": route, "http.response.status_code": status},
                )

    def _route(self, method: str, path: str) -> tuple[str, Callable[..., Awaitable[int]]]:
        found = _ROUTES.get(path)
        if found is None and path.startswith(_MODEL_PREFIX):
            found, path = ("GET", "model"), "/v1/models/{model}"
        if found is None:
            return "unknown", self._not_found
        wanted, name = found
        if method != wanted:
            return path, self._wrong_method
        return path, getattr(self, "_" + name)

    @contextlib.contextmanager
    def _span(self, method: str, route: str, headers: dict[str, str]) -> Iterator[trace.Span | None]:
        if self._tracer is None:
            yield None
            return
        with self._tracer.start_as_current_span(
            f"{method} {route}",
            context=propagate.extract(headers),
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route, "url.scheme": "http"},
        ) as span:
            yield span

    async def _admitted(
        self,
        handler: Callable[..., Awaitable[int]],
        scope: Scope,
        headers: dict[str, str],
        receive: Receive,
        send: Send,
    ) -> int:
        # The same in-flight cap as the gRPC face: one replica, one budget of requests at once.
        limit = self._in_flight
        if limit.active >= limit.limit:
            shed = ResourceExhausted(
                f"this edge replica is at its limit of {limit.limit} requests in flight; retry shortly",
                retry_after=0.5,
                reason="edge_in_flight",
            )
            return await _send_error(send, self._error(shed), headers)
        limit.active += 1
        try:
            return await handler(scope, headers, receive, send)
        except _ReplyError as reply:
            return await _send_error(send, reply.error, headers)
        except BallastError as exc:
            return await _send_error(send, self._error(exc), headers)
        except Exception:
            # A bug: the HTTP face's counterpart of kit/errors.py's interceptor answers a generic
            # 500 naming the trace id, and logs the traceback under it.
            trace_id = _trace_id()
            log.exception("unhandled error in %s (trace_id=%s)", scope["path"], trace_id)
            return await _send_error(send, fmt.internal_error(trace_id), headers)
        finally:
            limit.active -= 1

    # --- plumbing -------------------------------------------------------------------------------

    def _error(self, exc: BallastError, call: fmt.ChatCall | None = None) -> fmt.HttpError:
        return fmt.http_error(exc, call, max_retry_wait=self._settings.http_max_retry_wait)

    async def _body(self, headers: dict[str, str], receive: Receive) -> bytes:
        limit = self._settings.http_max_body_bytes
        too_large = fmt.HttpError(
            413,
            fmt.envelope(
                f"the request body is larger than {limit} bytes (BALLAST_EDGE_HTTP_MAX_BODY_BYTES)",
                "invalid_request_error",
                None,
                "request_too_large",
            ),
        )
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _ReplyError(too_large)
        chunks: list[bytes] = []
        size = 0
        # A client that trickles its body must not hold a slot past the request's deadline.
        async with asyncio.timeout(self._settings.http_request_timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise asyncio.CancelledError("the client went away while sending its request")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _ReplyError(too_large)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)

    def _request_id(self, headers: dict[str, str]) -> str:
        # As gRPC's x-request-id: the caller's own id when it is a plain id, a fresh one otherwise.
        given = headers.get("x-request-id", "")
        return given if _REQUEST_ID.match(given) else new_request_id()

    # --- routes ---------------------------------------------------------------------------------

    async def _not_found(self, scope: Scope, headers: dict[str, str], receive: Receive, send: Send) -> int:
        error = fmt.HttpError(
            404,
            fmt.envelope(
                f"no such endpoint: {scope['method']} {scope['path']} (Ballast serves /v1/chat/completions, "
                "/v1/models and /v1/embeddings)",
                "invalid_request_error",
                None,
                "unknown_url",
            ),
        )
        return await _send_error(send, error, headers)

    async def _wrong_method(self, scope: Scope, headers: dict[str, str], receive: Receive, send: Send) -> int:
        error = fmt.HttpError(
            405,
            fmt.envelope(
                f"{scope['method']} is not allowed on {scope['path']}", "invalid_request_error", None, None
            ),
        )
        return await _send_error(send, error, headers)

    async def _chat(self, scope: Scope, headers: dict[str, str], receive: Receive, send: Send) -> int:
        caller = await self._keys.caller_from(headers.items())
        data = fmt.loads(await self._body(headers, receive))
        call = fmt.parse_chat(data, headers)
        request_id = self._request_id(headers)
        deadline = Deadline(self._settings.http_request_timeout)
        try:
            async with _cancelled_on_disconnect(receive):
                if call.stream:
                    return await self._chat_stream(
                        call, caller, request_id, deadline, send, started=scope["ballast.started"]
                    )
                response = await self._servicer.chat(
                    caller, call.request, request_id, deadline, started=scope["ballast.started"]
                )
        except InvalidArgument as exc:
            # Validation names the edge's fields; the caller wrote OpenAI's parameters.
            raise _ReplyError(self._error(exc, call)) from None
        except BallastError as exc:
            raise _ReplyError(self._error(exc, call)) from None
        reply_headers = [
            _JSON,
            *_identity(response.request_id),
            (b"x-ballast-cache-hit", b"true" if response.cache_hit else b"false"),
            *fmt.quota_headers(response.quotas),
        ]
        if response.simulated:
            reply_headers.append((b"x-ballast-simulated", b"true"))
        if call.request.session_id:
            reply_headers.append((b"x-ballast-session-version", str(response.session_version).encode()))
        await _send(send, 200, reply_headers, fmt.completion(response, int(time.time())))
        return 200

    async def _chat_stream(
        self,
        call: fmt.ChatCall,
        caller: Any,
        request_id: str,
        deadline: Deadline,
        send: Send,
        *,
        started: float,
    ) -> int:
        events = self._servicer.chat_stream(caller, call.request, request_id, deadline, started=started)
        writer: fmt.ChunkWriter | None = None
        try:
            async for event in events:
                kind = event.WhichOneof("event")
                if kind == "start":
                    start = event.start
                    writer = fmt.ChunkWriter(
                        request_id, start.model, int(time.time()), include_usage=call.include_usage
                    )
                    stream_headers = [
                        *_SSE_HEADERS,
                        *_identity(request_id),
                        (b"x-ballast-cache-hit", b"true" if start.cache_hit else b"false"),
                    ]
                    if start.simulated:
                        stream_headers.append((b"x-ballast-simulated", b"true"))
                    await send({"type": "http.response.start", "status": 200, "headers": stream_headers})
                    await _chunk(send, writer.role())
                    continue
                if writer is None:
                    raise Unavailable("the chat stream sent content before its start event")
                if kind == "delta":
                    if event.delta.text:
                        await _chunk(send, writer.text(event.delta.text))
                    if event.delta.tool_calls:
                        await _chunk(send, writer.tool_calls(event.delta.tool_calls))
                elif kind == "done":
                    done = event.done
                    await _chunk(send, writer.finish(done.finish_reason))
                    if call.include_usage:
                        await _chunk(send, writer.usage(done.usage))
                    await send({"type": "http.response.body", "body": fmt.DONE, "more_body": False})
                    return 200
            raise Unavailable("the chat stream ended without its final answer")
        except Exception as exc:
            # Every failure, a bug included: before the headers it is re-raised (the caller above
            # answers it); after them the status is sent, so the stream ends with an error event,
            # never a clean [DONE].
            if writer is None:
                raise
            if isinstance(exc, BallastError):
                error = self._error(exc, call)
            else:
                trace_id = _trace_id()
                log.exception("unhandled error in a chat stream (trace_id=%s)", trace_id)
                error = fmt.internal_error(trace_id)
            await send(
                {"type": "http.response.body", "body": fmt.error_event(error.body), "more_body": False}
            )
            return 200
        finally:
            await events.aclose()  # type: ignore[attr-defined] # an async generator

    async def _models(self, scope: Scope, headers: dict[str, str], receive: Receive, send: Send) -> int:
        await self._keys.caller_from(headers.items())
        listing = await self._list_models()
        await _send(send, 200, [_JSON], fmt.models_json(listing))
        return 200

    async def _model(self, scope: Scope, headers: dict[str, str], receive: Receive, send: Send) -> int:
        await self._keys.caller_from(headers.items())
        model_id = scope["path"][len(_MODEL_PREFIX) :]
        body = fmt.model_json(await self._list_models(), model_id)
        if body is None:
            error = fmt.HttpError(
                404,
                fmt.envelope(
                    f"The model {model_id!r} does not exist",
                    "invalid_request_error",
                    "model",
                    "model_not_found",
                ),
            )
            return await _send_error(send, error, headers)
        await _send(send, 200, [_JSON], body)
        return 200

    async def _list_models(self) -> router_pb2.ListModelsResponse:
        deadline = Deadline(self._settings.http_request_timeout)
        return await self._down.call(
            "router",
            self._down.router.ListModels,
            router_pb2.ListModelsRequest(),
            self._down.timeout(deadline),
        )

    async def _embeddings(self, scope: Scope, headers: dict[str, str], receive: Receive, send: Send) -> int:
        caller = await self._keys.caller_from(headers.items())
        call = fmt.parse_embeddings(fmt.loads(await self._body(headers, receive)))
        call.request.caller.CopyFrom(caller)
        request_id = self._request_id(headers)
        deadline = Deadline(self._settings.http_request_timeout)
        async with _cancelled_on_disconnect(receive):
            response = await embed(
                self._settings, self._down, call.request, request_id, deadline, self._settler
            )
        await _send(
            send,
            200,
            [_JSON, *_identity(request_id)],
            fmt.embeddings_json(response, as_base64=call.base64),
        )
        return 200


def _identity(request_id: str) -> list[tuple[bytes, bytes]]:
    headers = [(b"x-request-id", request_id.encode()), (b"x-ballast-request-id", request_id.encode())]
    trace_id = _trace_id()
    if trace_id != "none":
        headers.append((b"x-ballast-trace-id", trace_id.encode()))
    return headers


def _trace_id() -> str:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else "none"


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    # With its length known, the answer goes out in one piece instead of chunked.
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _chunk(send: Send, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _send_error(send: Send, error: fmt.HttpError, request_headers: dict[str, str]) -> int:
    headers = [_JSON, *error.headers]
    trace_id = _trace_id()
    if trace_id != "none":
        headers.append((b"x-ballast-trace-id", trace_id.encode()))
    await _send(send, error.status, headers, error.body)
    return error.status


@contextlib.asynccontextmanager
async def _cancelled_on_disconnect(receive: Receive) -> AsyncIterator[None]:
    """Cancels the work inside when the client hangs up, as gRPC cancels an abandoned call: a
    model call nobody will read must not keep spending tokens."""
    task = asyncio.current_task()
    assert task is not None
    hung_up = False

    async def watch() -> None:
        nonlocal hung_up
        while (await receive())["type"] != "http.disconnect":
            pass
        hung_up = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        yield
    except asyncio.CancelledError:
        if not hung_up:
            raise
        task.uncancel()
        raise _ReplyError(
            fmt.HttpError(
                499,
                fmt.envelope("the client closed the connection", "invalid_request_error", None, "cancelled"),
            )
        ) from None
    finally:
        watcher.cancel()


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the edge's loop: the edge's own signal handling stops it, so it installs none."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


class HttpFront:
    """Starts and drains the HTTP face with the edge."""

    def __init__(self, app: OpenAIHttpApp, settings: EdgeSettings) -> None:
        self._app = app
        self._settings = settings
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self.port = 0

    def bind(self) -> int:
        """Takes the port first, so a clash fails start-up (as the gRPC port's does) before
        anything else has started; `serve` answers on it once the edge is ready."""
        host = self._settings.server.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
        # and without it a response written as head then body waits out the client's delayed ACK
        # (40 ms a request).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, self._settings.http_port))
        except OSError as exc:
            sock.close()
            raise RuntimeError(
                f"edge: cannot listen for HTTP on {host}:{self._settings.http_port} ({exc}); "
                "set BALLAST_EDGE_HTTP_PORT (0 picks a free port) or BALLAST_EDGE_HTTP=false"
            ) from None
        sock.listen(self._settings.http_backlog)
        sock.setblocking(False)
        self._socket = sock
        self.port = int(sock.getsockname()[1])
        return self.port

    @property
    def listening_socket(self) -> socket.socket | None:
        return self._socket

    async def serve(self) -> None:
        sock = self._socket
        if sock is None:
            raise RuntimeError("HttpFront.serve() before bind()")
        # The same certificate as the edge's public gRPC port (BALLAST_EDGE_TLS_*): with TLS on
        # there, the HTTP face speaks HTTPS too, never plaintext beside it.
        served = self._settings.server.server_tls
        tls: dict[str, Any] = {}
        if served is not None:
            tls = {"ssl_certfile": served.cert_file, "ssl_keyfile": served.key_file}
            if served.mutual:
                tls.update(ssl_ca_certs=served.ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(
            self._app,
            http="httptools",
            lifespan="off",
            access_log=False,
            log_config=None,
            server_header=False,
            timeout_keep_alive=math.ceil(self._settings.http_keep_alive),
            **tls,
        )
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="edge-http")
        ready = asyncio.ensure_future(self._server.ready.wait())
        await asyncio.wait([ready, self._task], return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            await self._task  # raises why it could not start
        log.info(
            "serving the OpenAI-compatible HTTP API",
            extra={"host": self._settings.server.host, "port": self.port, "tls": "on" if served else "off"},
        )

    async def drain(self, grace: float) -> None:
        """Stops accepting, lets in-flight requests finish within `grace`, then closes."""
        if self._server is None or self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = max(1, math.ceil(grace))
        self._server.should_exit = True
        await self._task
        self._server = None
        self._socket = None
