"""The asyncio network backend under the provider clients, against raw servers on 127.0.0.1:
TLS (verified and refused), timeouts, dropped connections, big bodies both ways, and pooled
connections that the server closed while they sat idle."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from services.router.providers.network import AsyncioBackend, asyncio_transport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serve(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """Reads one HTTP/1.1 request (headers and a content-length body); returns the body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return await reader.readexactly(length)


def response(body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode() + body


def client(**kw: object) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=4, keepalive_expiry=30)
    transport = asyncio_transport(http2=False, limits=limits, **kw)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5.0))


def test_the_transport_really_runs_on_the_asyncio_backend() -> None:
    transport = asyncio_transport(http2=True, limits=httpx.Limits())
    assert isinstance(transport._pool._network_backend, AsyncioBackend)


async def test_keep_alive_reuses_one_connection() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                body = await read_request(reader)
            except asyncio.IncompleteReadError:
                break
            writer.write(response(b"echo:" + body))
            await writer.drain()
        writer.close()

    async with serve(handler) as port, client() as http:
        for i in range(5):
            answer = await http.post(f"http://127.0.0.1:{port}/x", content=f"{i}".encode())
            assert answer.status_code == 200 and answer.content == f"echo:{i}".encode()
    assert connections == 1


async def test_big_bodies_both_ways_arrive_whole() -> None:
    upload = bytes(range(256)) * (40 * 1024)  # 10 MiB: fills the socket buffers, so writing pauses
    download = b"z" * (6 * 1024 * 1024)  # more than the read buffer's high-water mark

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await read_request(reader)
        writer.write(response(download, f"x-received: {len(body)}\r\nx-intact: {int(body == upload)}\r\n"))
        await writer.drain()
        writer.close()

    async with serve(handler) as port, client() as http:
        answer = await http.post(f"http://127.0.0.1:{port}/big", content=upload)
    assert answer.headers["x-received"] == str(len(upload)) and answer.headers["x-intact"] == "1"
    assert answer.content == download


async def test_a_silent_server_is_a_read_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async with serve(handler) as port, client() as http:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await http.get(f"http://127.0.0.1:{port}/", timeout=httpx.Timeout(5.0, read=0.2))
        assert time.monotonic() - started < 2


async def test_a_refused_connection_is_a_connect_error() -> None:
    async with serve(lambda r, w: asyncio.sleep(0)) as port:
        pass  # the port is free again
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/")


async def test_a_body_cut_short_is_a_protocol_error_not_an_answer() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()
        writer.close()

    async with serve(handler) as port, client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(f"http://127.0.0.1:{port}/")


async def test_a_pooled_connection_the_server_closed_is_not_reused() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(response(b"once"))  # keep-alive by default, then closed anyway
        await writer.drain()
        writer.close()

    async with serve(handler) as port, client() as http:
        assert (await http.get(f"http://127.0.0.1:{port}/")).content == b"once"
        await asyncio.sleep(0.1)  # the close reaches the idle pooled connection
        assert (await http.get(f"http://127.0.0.1:{port}/")).content == b"once"
    assert connections == 2


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls_is_verified_and_works(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                body = await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(response(b"secure:" + body))
            await writer.drain()
        writer.close()

    async with serve(handler, server_tls) as port:
        trusted = ssl.create_default_context(cafile=str(cert))
        async with client(verify=trusted) as http:
            for i in range(3):
                answer = await http.post(f"https://127.0.0.1:{port}/", content=str(i).encode())
                assert answer.content == f"secure:{i}".encode()
        async with client() as http:  # the system's trust store does not know this certificate
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.get(f"https://127.0.0.1:{port}/")
