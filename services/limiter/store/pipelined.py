"""One Redis connection with implicit pipelining, for the limiter's script calls.

Every decision is one EVALSHA, and many decisions are in flight at once. A pooled client sends
each on a connection of its own (or batches them behind a pipeline object); both cost more
Python per decision than the decision's own logic. Here each command is written the moment it
is issued, on one shared connection, and replies are matched to callers in order: Redis answers
a connection's commands in the order it received them. Writes issued in the same event-loop turn
leave in one send, so under load N decisions cost one write and one read, with no batching timer
and no added latency when idle. (envoyproxy/ratelimit does the same: "implicit pipelining".)
Replies are parsed by hiredis.

Failure model: a lost connection fails every command in flight with StoreUnavailableError, and
the next command reconnects. When the oldest unanswered command has waited `stall_after`, the
connection is taken to be hung (a paused or overloaded Redis): every command in flight fails
and the next one reconnects. So every call ends within `connect_timeout` + `stall_after`, and
callers need no timeout of their own (a per-call timer was a noticeable part of a decision's
cost). A caller that gives up anyway leaves its slot in the reply queue, answered or failed later.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import hiredis

from services.limiter.store.base import StoreUnavailableError

# Error replies that mean "this Redis cannot serve now", as good as unreachable.
_UNAVAILABLE = ("LOADING", "READONLY", "OOM", "MASTERDOWN", "BUSY", "TRYAGAIN", "CLUSTERDOWN")


class RedisReplyError(Exception):
    """An error reply from Redis (a script error, a wrong type...), with Redis's message."""

    @property
    def code(self) -> str:
        return str(self).split(" ", 1)[0]


@dataclass(frozen=True)
class Endpoint:
    host: str = "127.0.0.1"
    port: int = 6379
    unix_path: str = ""
    db: int = 0
    username: str = ""
    password: str = ""
    tls: ssl.SSLContext | None = None

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        """redis://[[user]:password@]host[:port][/db], rediss://... (TLS), unix:///path?db=N.

        Query options: db, ssl_cert_reqs (required|none), ssl_ca_certs (a CA file)."""
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(query) - {"db", "ssl_cert_reqs", "ssl_ca_certs"})
        if unknown:
            raise ValueError(f"unsupported Redis URL option(s): {', '.join(unknown)}")
        username = unquote(parts.username or "")
        password = unquote(parts.password or "")
        db_text = query.get("db") or (parts.path.strip("/") if parts.scheme != "unix" else "") or "0"
        if not db_text.isdigit():
            raise ValueError(f"Redis database must be a number, got {db_text!r}")
        if parts.scheme == "unix":
            return cls(unix_path=parts.path, db=int(db_text), username=username, password=password)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"Redis URL scheme must be redis, rediss or unix, got {parts.scheme!r}")
        tls = None
        if parts.scheme == "rediss":
            tls = ssl.create_default_context(cafile=query.get("ssl_ca_certs") or None)
            if query.get("ssl_cert_reqs", "required") == "none":
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(db_text),
            username=username,
            password=password,
            tls=tls,
        )


def pack(args: tuple[str | bytes | int, ...]) -> bytes:
    """A command in RESP: an array of bulk strings (hiredis's C packer)."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type] # its stub says a 1-tuple
    return packed


class _Replies(asyncio.Protocol):
    def __init__(self, on_lost: Any, stall_after: float) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=RedisReplyError)
        # (future, when sent) in the order sent: Redis replies in the same order.
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.outbox: list[bytes] = []  # commands issued this loop turn, sent together
        self.flush_scheduled = False
        self.lost = False
        self._on_lost = on_lost
        self._stall_after = stall_after
        # One timer per connection, not one per call: it fires when the oldest command in
        # flight has waited `stall_after`, so every call ends by then without a timeout of its own.
        self._watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                future, _ = self.waiting.popleft()
                if not future.done():  # a caller that timed out is no longer waiting
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked for
            self.fail(StoreUnavailableError(f"Redis protocol error: {exc!r}"))

    def send(self, command: bytes, future: asyncio.Future[Any]) -> None:
        self.waiting.append((future, time.monotonic()))
        self.outbox.append(command)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            future.get_loop().call_soon(self._flush)
        if self._watchdog is None and self._stall_after > 0:
            self._watchdog = future.get_loop().call_later(self._stall_after, self._watch)

    def _watch(self) -> None:
        self._watchdog = None
        if self.lost or not self.waiting:
            return
        waited = time.monotonic() - self.waiting[0][1]
        if waited >= self._stall_after * 0.95:  # timer slack
            self.fail(StoreUnavailableError(f"Redis did not answer within {self._stall_after:g} s"))
            return
        self._watchdog = asyncio.get_running_loop().call_later(self._stall_after - waited, self._watch)

    def _flush(self) -> None:
        self.flush_scheduled = False
        data, self.outbox = b"".join(self.outbox), []
        if not self.lost and self.transport is not None:
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(
            StoreUnavailableError(f"Redis connection lost: {exc!r}" if exc else "Redis closed the connection")
        )

    def fail(self, error: Exception) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if not self.lost:
            self.lost = True
            self._on_lost(self)
        if self.transport is not None:
            self.transport.abort()
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


class PipelinedRedis:
    def __init__(self, endpoint: Endpoint, *, connect_timeout: float, stall_after: float) -> None:
        self.endpoint = endpoint
        self.connect_timeout = connect_timeout
        self.stall_after = stall_after
        self._conn: _Replies | None = None
        self._connecting: asyncio.Future[_Replies] | None = None
        self.connects = 0  # for tests and stats: how many connections were opened

    async def execute(self, *args: str | bytes | int) -> Any:
        """Sends one command and returns its reply; an error reply raises RedisReplyError."""
        conn = self._conn
        if conn is None or conn.lost:
            conn = await self._connect()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        conn.send(pack(args), future)
        reply = await future  # the connection's watchdog fails it if Redis stops answering
        if isinstance(reply, RedisReplyError):
            if reply.code in _UNAVAILABLE:
                raise StoreUnavailableError(f"Redis: {reply}")
            raise reply
        return reply

    async def script_load(self, source: str) -> str:
        """Loads a script; its SHA1."""
        loaded = await self.execute("SCRIPT", "LOAD", source)
        return loaded.decode() if isinstance(loaded, bytes) else str(loaded)

    def _lost(self, conn: _Replies) -> None:
        if self._conn is conn:
            self._conn = None

    async def _connect(self) -> _Replies:
        # Callers arriving while a connection is being made share that attempt.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        attempt = self._connecting
        try:
            return await asyncio.shield(attempt)
        finally:
            if attempt.done():
                self._connecting = None
                if not attempt.cancelled():
                    attempt.exception()  # retrieved: a failed attempt is reported to its waiters only

    async def _open(self) -> _Replies:
        loop = asyncio.get_running_loop()
        e = self.endpoint
        conn: _Replies | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                if e.unix_path:
                    _, conn = await loop.create_unix_connection(
                        lambda: _Replies(self._lost, self.stall_after), e.unix_path
                    )
                else:
                    _, conn = await loop.create_connection(
                        lambda: _Replies(self._lost, self.stall_after), e.host, e.port, ssl=e.tls
                    )
                setup: list[tuple[str | bytes | int, ...]] = []
                if e.password:
                    setup.append(("AUTH", e.username, e.password) if e.username else ("AUTH", e.password))
                if e.db:
                    setup.append(("SELECT", e.db))
                futures = [loop.create_future() for _ in setup]
                for command, future in zip(setup, futures, strict=True):
                    conn.send(pack(command), future)
                for future in futures:
                    reply = await future
                    if isinstance(reply, RedisReplyError):
                        raise StoreUnavailableError(f"Redis refused the connection set-up: {reply}")
        except BaseException as exc:
            if conn is not None:
                conn.fail(StoreUnavailableError("connection set-up failed"))
            if isinstance(exc, TimeoutError):
                raise StoreUnavailableError(
                    f"could not connect to Redis within {self.connect_timeout:g} s"
                ) from exc
            if isinstance(exc, OSError):
                raise StoreUnavailableError(f"could not connect to Redis: {exc}") from exc
            raise
        self._conn = conn
        self.connects += 1
        return conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            conn.transport.close()
