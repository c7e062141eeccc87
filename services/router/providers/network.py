"""HTTP/1.1 under the providers' httpx clients: a connection pool on asyncio.

httpx sends through a transport; its default one is httpcore, which on asyncio goes through
anyio's locks and cancel scopes (and sniffio's task lookups, each a getpid() system call on
Python 3.11) several times per request. On a small non-streaming provider call that was about
half of the client's CPU, and the router pays it on every call (bench/router_overhead.py).
`Http11Transport` is an httpx transport (httpx's documented extension point) that speaks
HTTP/1.1 over asyncio's own transports, reading and writing it with http11.py (which replaced
h11, the parser httpcore uses, for a quarter of the CPU per call):

- one pool per provider: keep-alive connections per origin, at most `max_connections` open,
  idle ones closed after `keepalive_expiry`, callers beyond the limit wait (`pool` timeout);
- connect, read, write and pool timeouts from the request's `timeout` extension, raised as
  httpx's own exceptions (ConnectTimeout, ReadTimeout, ...), as are refused connections,
  TLS failures and broken or cut-off answers (ConnectError, ReadError, RemoteProtocolError);
- TLS with certificate verification (httpx's default context, or the one passed in);
- a connection goes back to the pool only after a whole request and answer; an answer left
  early (unless its rest has already arrived: a stream left at its last event, such as
  OpenAI's `[DONE]`, whose end of body came in the same read), an error or a cancelled call
  closes it. An idle connection the server closed (or that has anything unread) is never
  reused.

HTTP/2 is not offered: with Python's h2 a call costs more CPU than over HTTP/1.1, and the
providers' own SDKs speak HTTP/1.1 by default.
"""

# The socket helpers take a `timeout` argument, as httpx's timeouts are per operation:
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import httpx

from services.router.providers.http11 import (
    CLOSED,
    END,
    MAX_HEAD_BYTES,
    NEED_DATA,
    BodyWriter,
    LocalProtocolError,
    ProtocolError,
    Response,
    ResponseReader,
    request_head,
)

# Reading pauses once this much has arrived unread, so a fast stream cannot grow memory unbounded.
_READ_HIGH_WATER = 256 * 1024
# Request bodies up to this size leave in one write together with the headers.
_SMALL_BODY = 64 * 1024

Origin = tuple[bytes, bytes, int]  # scheme, host, port


@dataclass(frozen=True, slots=True)
class PreparedPost:
    """A POST's request head written once for every call to one URL with the same headers
    (`Http11Transport.prepare_post`): only the Content-Length is added per call."""

    origin: Origin
    # Request line and header lines, checked, up to where `content-length: N` and the blank line go.
    head: bytes
    keep_alive: bool
    # The request as httpx describes it (method, URL, headers; no body): what responses and
    # errors carry as their `request`.
    template: httpx.Request


class _Socket(asyncio.Protocol):
    """Collects what the socket delivers until the connection reads it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self._reader: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._reading_paused = False

    # --- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's is not a subclass of asyncio.Transport, so no isinstance.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _READ_HIGH_WATER and self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._wake_reader()
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake_reader()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # --- for the connection ------------------------------------------------------------------
    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def take(self) -> bytes:
        chunk = bytes(self.buffer)
        self.buffer.clear()
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return chunk

    async def wait_readable(self, timeout: float | None) -> None:
        self._reader = waiter = asyncio.get_running_loop().create_future()
        try:
            await _wait(waiter, timeout)
        finally:
            self._reader = None

    async def wait_writable(self, timeout: float | None) -> None:
        waiter = self._writable
        if waiter is not None and not waiter.done():
            await _wait(waiter, timeout)


async def _wait(waiter: asyncio.Future[None], timeout: float | None) -> None:
    """Awaits `waiter`; TimeoutError if `timeout` seconds pass first (None waits for ever). A
    timer callback, not asyncio.timeout: no task lookup or cancellation on every socket wait."""
    if timeout is None:
        await waiter
        return
    timer = waiter.get_loop().call_later(timeout, _expire, waiter)
    try:
        await waiter
    finally:
        timer.cancel()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Connection:
    """One keep-alive HTTP/1.1 connection: requests written and responses read (http11.py)
    over a `_Socket`."""

    def __init__(
        self,
        origin: Origin,
        transport: asyncio.Transport,
        sock: _Socket,
        max_head_bytes: int = MAX_HEAD_BYTES,
    ) -> None:
        self.origin = origin
        self.transport = transport
        self.sock = sock
        self.reader = ResponseReader(max_head_bytes)
        # The current request was written whole, and does not ask to close the connection.
        self.request_done = False
        self.request_keeps_alive = True
        self.idle_since = 0.0

    def reusable_idle(self) -> bool:
        """An idle connection may carry the next request: nothing unread, not closed."""
        sock = self.sock
        return not sock.eof and not sock.buffer and not self.reader.unread and not self.transport.is_closing()

    def exchange_complete(self) -> bool:
        """The request and its whole response went through, and both ends keep the connection."""
        return (
            self.request_done and self.request_keeps_alive and self.reader.complete and self.reader.keep_alive
        )

    def close(self) -> None:
        self.transport.close()

    async def _write(self, data: bytes, timeout: float | None, request: httpx.Request) -> None:
        if self.transport.is_closing():
            raise httpx.WriteError(str(self.sock.error or "connection closed"), request=request)
        self.transport.write(data)
        try:
            await self.sock.wait_writable(timeout)
        except TimeoutError as exc:
            raise httpx.WriteTimeout("timed out writing to the provider", request=request) from exc
        if self.sock.error is not None:
            raise httpx.WriteError(str(self.sock.error), request=request)

    def _begin(self, keep_alive: bool, *, head_request: bool = False) -> None:
        """A new exchange on this connection: its request not yet written, its response expected."""
        self.request_done = False
        self.request_keeps_alive = keep_alive
        self.reader.start(head_request=head_request)

    async def send(self, request: httpx.Request, timeout: float | None) -> None:
        method = request.method.encode()
        head = request_head(method, request.url.raw_path, request.headers.raw)
        self._begin(head.keep_alive, head_request=method == b"HEAD")
        body = BodyWriter(head.content_length)
        pending = [head.data]
        size = 0
        stream = request.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        async for chunk in stream:
            if not chunk:
                continue
            pending.append(body.data(chunk))
            size += len(chunk)
            if size > _SMALL_BODY:
                await self._write(b"".join(pending), timeout, request)
                pending, size = [], 0
        pending.append(body.end())
        await self._write(b"".join(pending), timeout, request)
        self.request_done = True

    async def send_prepared(self, prepared: PreparedPost, content: bytes, timeout: float | None) -> None:
        self._begin(prepared.keep_alive)
        await self._write(
            b"%bcontent-length: %d\r\n\r\n%b" % (prepared.head, len(content), content),
            timeout,
            prepared.template,
        )
        self.request_done = True

    async def next_event(self, timeout: float | None, request: httpx.Request) -> Any:
        """The next event of the response (http11.ResponseReader), reading from the socket as
        needed."""
        reader = self.reader
        while True:
            try:
                event = reader.next_event()
            except ProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc), request=request) from exc
            if event is not NEED_DATA:
                return event
            sock = self.sock
            if not sock.buffer and not sock.eof:
                try:
                    await sock.wait_readable(timeout)
                except TimeoutError as exc:
                    raise httpx.ReadTimeout("timed out reading from the provider", request=request) from exc
            if sock.buffer:
                reader.receive(sock.take())
            elif sock.error is not None:
                raise httpx.ReadError(str(sock.error) or type(sock.error).__name__, request=request)
            else:
                reader.receive(b"")  # the server closed: the reader tells a clean end from a cut-off one

    async def receive_head(self, timeout: float | None, request: httpx.Request) -> Response:
        """The response's head (informational 1xx answers are skipped by the reader)."""
        event = await self.next_event(timeout, request)
        if event is CLOSED:
            raise httpx.RemoteProtocolError(
                "the provider closed the connection without sending a response", request=request
            )
        assert type(event) is Response  # the first event of a response is its head
        return event


class _Body(httpx.AsyncByteStream):
    """A response body read from its connection; closing it gives the connection back (when the
    exchange ended cleanly) or closes it (when the body was left unread or broke).

    It is its own iterator (`__anext__`), not an async generator: a reader that stops early
    (a stream at its terminal event) leaves no suspended generator behind for the event loop's
    finalizer hook to close in a task of its own."""

    def __init__(
        self, pool: Http11Transport, connection: _Connection, timeout: float | None, request: httpx.Request
    ) -> None:
        self._pool = pool
        self._connection = connection
        self._timeout = timeout
        self._request = request
        self._closed = False
        self._ended = False

    def __aiter__(self) -> _Body:  # an iterator, not a generator (above)
        return self

    async def __anext__(self) -> bytes:
        """The body's next bytes: everything that has arrived by now, at least one piece."""
        if self._closed or self._ended:
            raise StopAsyncIteration
        event = await self._connection.next_event(self._timeout, self._request)
        if type(event) is bytes:
            more = self._arrived()
            return event + b"".join(more) if more else event
        if event is END:
            self._ended = True
            raise StopAsyncIteration
        # The reader raises on a body cut off; anything else here is a bug: say so plainly.
        raise httpx.RemoteProtocolError("the answer ended early", request=self._request)

    def _arrived(self) -> list[bytes]:
        """The pieces of the body (HTTP chunks) already received, without waiting for more: a
        stream whose events came in one read is handed on in one piece. Its end is noted for the
        next call; an error is left for the next call to raise."""
        connection = self._connection
        reader = connection.reader
        pieces: list[bytes] = []
        while True:
            try:
                event = reader.next_event()
            except ProtocolError:
                return pieces
            if type(event) is bytes:
                pieces.append(event)
            elif event is NEED_DATA and connection.sock.buffer:
                reader.receive(connection.sock.take())
            else:
                if event is END:
                    self._ended = True
                return pieces

    def _finish_from_buffer(self) -> None:
        """Reads what has already arrived of a body its reader left (never waiting for more):
        when that holds the body's end, the exchange is complete and the connection reusable."""
        connection = self._connection
        reader = connection.reader
        if connection.sock.buffer:
            reader.receive(connection.sock.take())
        while True:
            try:
                event = reader.next_event()
            except ProtocolError:
                return
            if event is END or event is NEED_DATA:
                return
            # Data nobody will read: dropped.

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        connection = self._connection
        if connection.request_done and not connection.reader.complete:
            self._finish_from_buffer()
        self._pool.release(connection, reusable=connection.exchange_complete())


def _origin(url: httpx.URL, request: httpx.Request) -> Origin:
    scheme = url.raw_scheme
    if scheme not in (b"http", b"https"):
        raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}", request=request)
    return (scheme, url.raw_host, url.port or (443 if scheme == b"https" else 80))


class Http11Transport(httpx.AsyncBaseTransport):
    """A pooled HTTP/1.1 transport for one provider's client (see the module docstring)."""

    def __init__(
        self,
        *,
        limits: httpx.Limits,
        verify: ssl.SSLContext | bool = True,
        max_head_bytes: int = MAX_HEAD_BYTES,
    ) -> None:
        # The longest response head (or chunk-size line, or trailers) a server may send.
        self._max_head_bytes = max_head_bytes
        self._max_open = limits.max_connections or 1 << 30
        self._max_idle = (
            limits.max_keepalive_connections
            if limits.max_keepalive_connections is not None
            else self._max_open
        )
        self._keepalive_expiry = limits.keepalive_expiry
        self._ssl = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify=verify)
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._idle_count = 0
        self._open = 0  # connections open or being opened, idle ones included
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    # --- the pool ----------------------------------------------------------------------------
    def _take_idle(self, origin: Origin, now: float) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()  # the most recently used: least likely to have been closed
            self._idle_count -= 1
            expired = (
                self._keepalive_expiry is not None and now - connection.idle_since > self._keepalive_expiry
            )
            if not expired and connection.reusable_idle():
                return connection
            self._discard(connection)
        return None

    def _evict_one_idle(self) -> bool:
        """Closes the longest-idle connection of any origin, to make room; False if none."""
        oldest: deque[_Connection] | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].idle_since < oldest[0].idle_since):
                oldest = idle
        if oldest is None:
            return False
        self._idle_count -= 1
        self._discard(oldest.popleft())
        return True

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._free_slot()

    def _free_slot(self) -> None:
        """One connection fewer is open (or being opened): a waiting caller may open one."""
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _acquire(
        self, origin: Origin, timeout: float | None, request: httpx.Request
    ) -> _Connection | None:
        """An idle connection to `origin`, or None with a slot reserved for a new one."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._closed:
                raise httpx.TransportError("the provider client is closed", request=request)
            connection = self._take_idle(origin, loop.time())
            if connection is not None:
                return connection
            if self._open < self._max_open or self._evict_one_idle():
                self._open += 1
                return None
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise httpx.PoolTimeout("no free connection to the provider in time", request=request)
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await _wait(waiter, remaining)
            except TimeoutError as exc:
                raise httpx.PoolTimeout(
                    "no free connection to the provider in time", request=request
                ) from exc
            except BaseException:
                self._wake_one()  # a wake-up meant for this caller goes to the next one
                raise

    def release(self, connection: _Connection, *, reusable: bool) -> None:
        if reusable and not self._closed and self._idle_count < self._max_idle and connection.reusable_idle():
            connection.idle_since = asyncio.get_running_loop().time()
            self._idle.setdefault(connection.origin, deque()).append(connection)
            self._idle_count += 1
            self._wake_one()
        else:
            self._discard(connection)

    async def _connect(self, origin: Origin, timeout: float | None, request: httpx.Request) -> _Connection:
        scheme, host, port = origin
        name = host.decode("ascii")
        loop = asyncio.get_running_loop()
        tls = self._ssl if scheme == b"https" else None
        if tls is None:
            connecting = loop.create_connection(_Socket, name, port)
        else:
            connecting = loop.create_connection(
                _Socket, name, port, ssl=tls, server_hostname=name, ssl_handshake_timeout=timeout
            )
        try:
            transport, sock = await asyncio.wait_for(connecting, timeout)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"timed out connecting to {name}:{port}", request=request) from exc
        except OSError as exc:  # refused, unreachable, TLS verification failed, ...
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        # asyncio sets TCP_NODELAY on TCP sockets itself.
        return _Connection(origin, transport, sock, self._max_head_bytes)

    # --- httpx.AsyncBaseTransport --------------------------------------------------------------
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        write = timeouts.get("write")

        def send(connection: _Connection) -> Awaitable[None]:
            return connection.send(request, write)

        return await self._exchange(_origin(request.url, request), timeouts, send, request)

    # --- the providers' calls ----------------------------------------------------------------
    def prepare_post(self, url: httpx.URL, headers: httpx.Headers) -> PreparedPost:
        """The head of a POST to `url` with `headers`, as httpx would send it (its Host header
        included), checked once: `post_prepared` sends it with any body."""
        template = httpx.Request("POST", url, headers=headers)  # httpx adds Host (and a length)
        fields = [
            (n, v)
            for n, v in template.headers.raw
            if n.lower() not in (b"content-length", b"transfer-encoding")
        ]
        try:
            head = request_head(b"POST", url.raw_path, fields)
        except LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc), request=template) from exc
        return PreparedPost(_origin(url, template), head.data[:-2], head.keep_alive, template)

    async def post_prepared(
        self, prepared: PreparedPost, content: bytes, timeouts: Mapping[str, float | None]
    ) -> httpx.Response:
        """What handle_async_request does for a POST of `content` with a prepared head, without
        an httpx.Request per call: the response and errors carry the prepared one (its body is
        not attached)."""
        write = timeouts.get("write")

        def send(connection: _Connection) -> Awaitable[None]:
            return connection.send_prepared(prepared, content, write)

        response = await self._exchange(prepared.origin, timeouts, send, prepared.template)
        response.request = prepared.template
        return response

    async def _exchange(
        self,
        origin: Origin,
        timeouts: Mapping[str, float | None],
        send: Callable[[_Connection], Awaitable[None]],
        request: httpx.Request,
    ) -> httpx.Response:
        """Sends a request on a pooled (or new) connection to `origin`; the response comes
        back once its head has arrived, its body still to read."""
        connection = await self._acquire(origin, timeouts.get("pool"), request)
        if connection is None:
            try:
                connection = await self._connect(origin, timeouts.get("connect"), request)
            except BaseException:
                self._free_slot()  # the slot _acquire reserved for this connection
                raise
        read_timeout = timeouts.get("read")
        try:
            await send(connection)
            head = await connection.receive_head(read_timeout, request)
        except BaseException as exc:
            self._discard(connection)
            if isinstance(exc, LocalProtocolError):
                raise httpx.LocalProtocolError(str(exc), request=request) from exc
            raise
        return httpx.Response(
            head.status_code,
            headers=head.headers,
            stream=_Body(self, connection, read_timeout, request),
            extensions={"http_version": b"HTTP/" + head.http_version, "reason_phrase": head.reason},
        )

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                self._discard(idle.popleft())
        self._idle_count = 0
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # they find the pool closed
