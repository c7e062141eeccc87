"""The limiter's pipelined Redis connection against a real redis-server of its own: replies reach
the right callers, errors keep the connection, and a killed, paused or restarted Redis fails
the calls in flight and is reconnected to without a restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.kit.config import ConfigError, Env
from services.kit.net import free_port
from services.limiter.config import LimiterSettings
from services.limiter.store.base import StoreUnavailableError
from services.limiter.store.pipelined import Endpoint, PipelinedRedis, RedisReplyError, pack

PASSWORD = "s3cret"


class Server:
    """redis-server on a free port and a unix socket, with a password."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ballast-pipelined-"))
        self.socket = self.dir / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--dir", str(self.dir), "--requirepass", PASSWORD, "--unixsocket", str(self.socket)),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.socket.unlink(missing_ok=True)

    def url(self, db: int = 0) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/{db}"


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    s = Server()
    s.start()
    yield s
    if s.proc is not None and s.proc.poll() is None:
        os.kill(s.proc.pid, signal.SIGCONT)
        s.kill()


def connection(url: str, timeout: float = 2.0) -> PipelinedRedis:
    return PipelinedRedis(Endpoint.from_url(url), connect_timeout=timeout, stall_after=timeout)


def test_urls_are_read_like_redis_py_reads_them() -> None:
    e = Endpoint.from_url("redis://me:p%40ss@cache.internal:6380/3")
    assert (e.host, e.port, e.db, e.username, e.password, e.tls) == (
        "cache.internal",
        6380,
        3,
        "me",
        "p@ss",
        None,
    )
    assert Endpoint.from_url("redis://127.0.0.1?db=2").db == 2
    assert Endpoint.from_url("unix:///run/redis.sock?db=4") == Endpoint(unix_path="/run/redis.sock", db=4)
    tls = Endpoint.from_url("rediss://h:6379/0?ssl_cert_reqs=none").tls
    assert tls is not None and not tls.check_hostname
    with pytest.raises(ValueError, match="unsupported Redis URL option"):
        Endpoint.from_url("redis://h/0?socket_keepalive=1")
    with pytest.raises(ValueError, match="database must be a number"):
        Endpoint.from_url("redis://h/zero")


def test_a_bad_store_url_is_a_config_error_naming_the_variable() -> None:
    env = Env({"BALLAST_LIMITER_STORE": "redis://127.0.0.1:6379/0?pool=9"})
    LimiterSettings.from_env(env)
    with pytest.raises(ConfigError, match=r"BALLAST_LIMITER_STORE=.*unsupported Redis URL option\(s\): pool"):
        env.check()


def test_commands_are_packed_as_resp_arrays() -> None:
    assert (
        pack(("EVALSHA", "ab", 1, b"k\r\n"))
        == b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$3\r\nk\r\n\r\n"
    )


async def test_concurrent_calls_share_one_connection_and_get_their_own_replies(server: Server) -> None:
    redis = connection(server.url(db=5))
    try:
        replies = await asyncio.gather(*(redis.execute("ECHO", f"caller-{i}") for i in range(300)))
        assert replies == [f"caller-{i}".encode() for i in range(300)]
        counts = await asyncio.gather(*(redis.execute("INCR", "n") for _ in range(100)))
        assert sorted(counts) == list(range(1, 101))
        assert redis.connects == 1
        # SELECT was applied: the counter lives in database 5 only.
        other = connection(server.url(db=0))
        assert await other.execute("GET", "n") is None
        await other.close()
    finally:
        await redis.close()


async def test_unix_socket_and_auth(server: Server) -> None:
    redis = connection(f"unix://:{PASSWORD}@{server.socket}?db=1")
    assert await redis.execute("PING") == b"PONG"
    await redis.close()
    wrong = connection(f"redis://:nope@127.0.0.1:{server.port}/0")
    with pytest.raises(StoreUnavailableError, match="refused the connection set-up"):
        await wrong.execute("PING")


async def test_an_error_reply_is_raised_and_the_connection_goes_on(server: Server) -> None:
    redis = connection(server.url())
    try:
        with pytest.raises(RedisReplyError) as caught:
            await redis.execute("EVALSHA", "0" * 40, 0)
        assert caught.value.code == "NOSCRIPT"
        assert await redis.execute("PING") == b"PONG"
        assert redis.connects == 1
    finally:
        await redis.close()


async def test_a_killed_redis_fails_calls_in_flight_then_reconnects(server: Server) -> None:
    redis = connection(server.url())
    try:
        await redis.execute("SET", "k", "v")
        blocked = asyncio.ensure_future(redis.execute("BLPOP", "nothing", 0))  # in flight, unanswered
        await asyncio.sleep(0.1)
        server.kill()
        with pytest.raises(StoreUnavailableError):
            await blocked
        with pytest.raises(StoreUnavailableError, match="could not connect"):
            await redis.execute("PING")
        server.start()
        assert await redis.execute("PING") == b"PONG"
        assert redis.connects == 2
    finally:
        await redis.close()


async def test_a_paused_redis_is_dropped_after_the_stall_timeout(server: Server) -> None:
    """Calls in flight on a hung connection fail by themselves (no caller timeout needed), all
    of them, once the oldest has waited the stall timeout; the next call reconnects."""
    assert server.proc is not None
    redis = connection(server.url(), timeout=0.3)
    try:
        assert await redis.execute("PING") == b"PONG"
        os.kill(server.proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        first = asyncio.create_task(redis.execute("PING"))
        await asyncio.sleep(0.1)
        outcomes = await asyncio.gather(first, redis.execute("PING"), return_exceptions=True)
        elapsed = time.monotonic() - started
        assert all(isinstance(o, StoreUnavailableError) for o in outcomes), outcomes
        assert 0.25 <= elapsed < 1.0
        os.kill(server.proc.pid, signal.SIGCONT)
        assert await redis.execute("PING") == b"PONG"
        assert redis.connects == 2
    finally:
        await redis.close()
