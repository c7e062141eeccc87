"""The limiter store's Redis connection (redis-py): URLs, auth, unix sockets, errors, outages."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
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
from services.limiter.store.library import LibraryRedis, RedisReplyError

PASSWORD = "s3cret"


def _accepts(family: int, address: str | tuple[str, int]) -> bool:
    with socket.socket(family) as probe:
        try:
            probe.connect(address)
        except OSError:
            return False
        return True


class Server:
    """redis-server on a free port and a unix socket, with a password."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ballast-limiter-redis-"))
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
        # The socket file appears when redis binds it, a moment before it listens: wait until
        # both the unix socket and the port accept connections, not for the file.
        deadline = time.monotonic() + 30
        while not (
            _accepts(socket.AF_UNIX, str(self.socket)) and _accepts(socket.AF_INET, ("127.0.0.1", self.port))
        ):
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


def connection(url: str, timeout: float = 30.0) -> LibraryRedis:
    return LibraryRedis(url, timeout=timeout, cluster=False)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:6379/0?pool=9", r"unsupported Redis URL option\(s\): pool"),
        ("redis://127.0.0.1:6379/zero", "database must be a number"),
        ("redis://127.0.0.1:6379/0?cluster=maybe", "cluster must be true or false"),
    ],
)
def test_a_bad_store_url_is_a_config_error_naming_the_variable(url: str, message: str) -> None:
    env = Env({"BALLAST_LIMITER_STORE": url})
    LimiterSettings.from_env(env)
    with pytest.raises(ConfigError, match=rf"BALLAST_LIMITER_STORE=.*{message}"):
        env.check()


async def test_concurrent_calls_get_their_own_replies_in_the_chosen_database(server: Server) -> None:
    redis = connection(server.url(db=5))
    try:
        replies = await asyncio.gather(*(redis.execute("ECHO", f"caller-{i}") for i in range(300)))
        assert replies == [f"caller-{i}".encode() for i in range(300)]
        counts = await asyncio.gather(*(redis.execute("INCR", "n") for _ in range(100)))
        assert sorted(counts) == list(range(1, 101))
        other = connection(server.url(db=0))
        assert await other.execute("GET", "n") is None  # the counter lives in database 5 only
        await other.close()
    finally:
        await redis.close()


async def test_unix_socket_and_auth(server: Server) -> None:
    redis = connection(f"unix://:{PASSWORD}@{server.socket}?db=1")
    assert await redis.execute("PING") is True
    await redis.close()
    wrong = connection(f"redis://:nope@127.0.0.1:{server.port}/0")
    with pytest.raises((StoreUnavailableError, RedisReplyError)):
        await wrong.execute("PING")
    await wrong.close()


async def test_an_error_reply_is_raised_and_the_connection_goes_on(server: Server) -> None:
    redis = connection(server.url())
    try:
        with pytest.raises(RedisReplyError) as caught:
            await redis.execute("EVALSHA", "0" * 40, 0)
        assert caught.value.code == "NOSCRIPT"
        with pytest.raises(RedisReplyError) as wrong_type:
            await redis.execute("SET", "s", "v")
            await redis.execute("HGET", "s", "f")
        assert wrong_type.value.code == "WRONGTYPE"
        sha = await redis.script_load("return 7")
        assert await redis.execute("EVALSHA", sha, 0) == 7
    finally:
        await redis.close()


async def test_a_killed_redis_is_unavailable_then_reconnects(server: Server) -> None:
    redis = connection(server.url(), timeout=5)
    try:
        await redis.execute("SET", "k", "v")
        server.kill()
        with pytest.raises(StoreUnavailableError):
            await redis.execute("GET", "k")
        server.start()
        assert await redis.execute("SET", "k", "w")
    finally:
        await redis.close()


async def test_a_paused_redis_is_unavailable_rather_than_hanging(server: Server) -> None:
    """A read that gets no answer ends with the socket timeout: the fail mode decides."""
    assert server.proc is not None
    redis = connection(server.url(), timeout=0.3)
    try:
        assert await redis.execute("ECHO", "x") == b"x"
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            outcomes = await asyncio.gather(
                redis.execute("ECHO", "a"), redis.execute("ECHO", "b"), return_exceptions=True
            )
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert all(isinstance(o, StoreUnavailableError) for o in outcomes), outcomes
        assert await redis.execute("ECHO", "y") == b"y"
    finally:
        await redis.close()
