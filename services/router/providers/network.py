"""The sockets under the providers' httpx clients: plain asyncio instead of anyio.

httpx sends through httpcore, and httpcore reaches the network through a pluggable backend. Its
default on asyncio goes through anyio, which wraps every read and write in cancel scopes and
task checks; on a small non-streaming call that is a fifth of the client's CPU, and the router
pays it on every provider call (bench/router_overhead.py measures it). This backend speaks to
asyncio's transports directly: one buffer per connection, timeouts as timer callbacks rather than
extra tasks, and the same httpcore exceptions the anyio backend raises, so httpx's error mapping
(ReadTimeout, ConnectError, ...) and everything above it are unchanged.
"""

# httpcore's backend interface takes a `timeout` argument on every call, hence:
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Coroutine, Iterable
from typing import Any

import httpcore
import httpx
from httpcore import AsyncNetworkBackend, AsyncNetworkStream
from httpcore._backends.base import SOCKET_OPTION

# Reading pauses once this much has arrived unread, so a fast stream cannot grow memory unbounded.
_READ_HIGH_WATER = 256 * 1024


class _Connection(asyncio.Protocol):
    """Collects what the socket delivers until httpcore reads it."""

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
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

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

    # --- for the stream ----------------------------------------------------------------------
    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def take(self, max_bytes: int) -> bytes:
        if len(self.buffer) <= max_bytes:
            chunk = bytes(self.buffer)
            self.buffer.clear()
        else:
            chunk = bytes(self.buffer[:max_bytes])
            del self.buffer[:max_bytes]
        if self._reading_paused and len(self.buffer) <= _READ_HIGH_WATER // 2 and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return chunk

    async def wait_readable(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._reader = waiter = loop.create_future()
        timer = loop.call_later(timeout, _expire, waiter) if timeout is not None else None
        try:
            await waiter
        finally:
            self._reader = None
            if timer is not None:
                timer.cancel()

    async def wait_writable(self, timeout: float | None) -> None:
        waiter = self._writable
        if waiter is None or waiter.done():
            return
        loop = asyncio.get_running_loop()
        timer = loop.call_later(timeout, _expire, waiter) if timeout is not None else None
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class AsyncioStream(AsyncNetworkStream):
    def __init__(self, connection: _Connection, transport: asyncio.Transport) -> None:
        self._connection = connection
        self._transport = transport

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        connection = self._connection
        if not connection.buffer and not connection.eof:
            try:
                await connection.wait_readable(timeout)
            except TimeoutError as exc:
                raise httpcore.ReadTimeout("timed out reading from the provider") from exc
        if connection.buffer:
            return connection.take(max_bytes)
        if connection.error is not None:
            raise httpcore.ReadError(str(connection.error) or type(connection.error).__name__)
        return b""  # the peer closed: httpcore turns a premature end into RemoteProtocolError

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        if self._transport.is_closing():
            raise httpcore.WriteError(str(self._connection.error or "connection closed"))
        self._transport.write(buffer)
        try:
            await self._connection.wait_writable(timeout)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout("timed out writing to the provider") from exc
        if self._connection.error is not None:
            raise httpcore.WriteError(str(self._connection.error))

    async def aclose(self) -> None:
        self._transport.close()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self._transport,
                self._connection,
                ssl_context,
                server_hostname=server_hostname,
                ssl_handshake_timeout=timeout,
            )
        except TimeoutError as exc:
            self._transport.close()
            raise httpcore.ConnectTimeout("timed out in the TLS handshake") from exc
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            self._transport.close()
            raise httpcore.ConnectError(str(exc)) from exc
        if transport is None:  # the connection closed during the handshake
            raise httpcore.ConnectError("connection closed during the TLS handshake")
        assert isinstance(transport, asyncio.Transport)
        self._connection.transport = transport
        return AsyncioStream(self._connection, transport)

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        if info == "socket":
            return self._transport.get_extra_info("socket")
        if info == "is_readable":
            # An idle pooled connection with something to read (or closed) must not be reused.
            return bool(self._connection.buffer) or self._connection.eof
        return None


class AsyncioBackend(AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        local = (local_address, 0) if local_address else None
        # asyncio sets TCP_NODELAY on TCP sockets itself.
        connecting = asyncio.get_running_loop().create_connection(_Connection, host, port, local_addr=local)
        return await _connected(connecting, f"{host}:{port}", timeout, socket_options)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[SOCKET_OPTION] | None = None
    ) -> AsyncNetworkStream:
        connecting = asyncio.get_running_loop().create_unix_connection(_Connection, path)
        return await _connected(connecting, path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def _connected(
    connecting: Coroutine[Any, Any, tuple[asyncio.Transport, _Connection]],
    where: str,
    timeout: float | None,
    options: Iterable[SOCKET_OPTION] | None,
) -> AsyncioStream:
    """The stream once `connecting` completes, with httpcore's errors for a slow or failed connect."""
    try:
        transport, connection = await asyncio.wait_for(connecting, timeout)
    except TimeoutError as exc:
        raise httpcore.ConnectTimeout(f"timed out connecting to {where}") from exc
    except OSError as exc:
        raise httpcore.ConnectError(str(exc)) from exc
    sock: socket.socket | None = transport.get_extra_info("socket")
    for option in options or ():
        if sock is not None:
            sock.setsockopt(*option)
    return AsyncioStream(connection, transport)


def asyncio_transport(
    *, http2: bool, limits: httpx.Limits, verify: ssl.SSLContext | bool = True
) -> httpx.AsyncHTTPTransport:
    """httpx's own transport (pool, HTTP/1.1 and HTTP/2, TLS verification), on AsyncioBackend."""
    transport = httpx.AsyncHTTPTransport(http2=http2, limits=limits, verify=verify, trust_env=False)
    pool = getattr(transport, "_pool", None)
    # httpx keeps its httpcore pool private; its constructor offers no backend argument. Should a
    # newer httpx rename the attribute, this fails at start-up (and in the tests), not silently.
    if not isinstance(pool, httpcore.AsyncConnectionPool) or not hasattr(pool, "_network_backend"):
        raise RuntimeError("this httpx version hides its connection pool; cannot use AsyncioBackend")
    pool._network_backend = AsyncioBackend()
    return transport
