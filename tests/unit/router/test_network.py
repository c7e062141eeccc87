"""The HTTP/1.1 transport under the provider clients, against raw servers on 127.0.0.1: TLS
(verified and refused), timeouts, dropped connections, big and chunked bodies, informational
answers, the pool's limit and timeout, cancelled calls, and pooled connections that the server
closed while they sat idle or said it would close."""

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

from services.router.providers.network import Http11Transport

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


async def read_request_and_headers(reader: asyncio.StreamReader) -> tuple[dict[str, str], bytes]:
    """Reads one HTTP/1.1 request (headers and a content-length body): its headers, lower-cased
    names, and its body."""
    head = await reader.readuntil(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode().partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return headers, await reader.readexactly(int(headers.get("content-length", 0)))


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """Reads one HTTP/1.1 request; returns the body."""
    return (await read_request_and_headers(reader))[1]


def response(body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode() + body


async def answer_each_request(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    answer: Callable[[dict[str, str], bytes], Awaitable[bytes]],
) -> None:
    """A keep-alive server's connection: answers every request (given its headers and body) until
    the client closes the connection or it breaks, then closes it."""
    try:
        while True:
            headers, body = await read_request_and_headers(reader)
            writer.write(await answer(headers, body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def client(max_connections: int = 4, pool_timeout: float = 5.0, **kw: object) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max_connections, keepalive_expiry=30)
    transport = Http11Transport(limits=limits, **kw)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5.0, pool=pool_timeout))


async def test_the_pool_never_opens_more_than_its_limit_and_times_out_waiting() -> None:
    open_now = peak = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)

        async def answer(headers: dict[str, str], body: bytes) -> bytes:
            await asyncio.sleep(0.3 if body == b"slow" else 0.05)
            return response(b"done:" + body)

        try:
            await answer_each_request(reader, writer, answer)
        finally:
            open_now -= 1

    async with serve(handler) as port, client(max_connections=2) as http:
        url = f"http://127.0.0.1:{port}/"
        answers = await asyncio.gather(*(http.post(url, content=str(i).encode()) for i in range(6)))
        assert sorted(a.content for a in answers) == [f"done:{i}".encode() for i in range(6)]
        assert peak == 2  # six calls, two connections, each reused
        busy = [asyncio.create_task(http.post(url, content=b"slow")) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.PoolTimeout):
            await http.post(url, content=b"third", timeout=httpx.Timeout(5.0, pool=0.1))
        assert [(await b).content for b in busy] == [b"done:slow", b"done:slow"]
        assert (await http.post(url, content=b"after")).content == b"done:after"


async def test_a_cancelled_call_closes_its_connection_and_frees_its_slot() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            body = await read_request(reader)
            if body == b"hang":
                await asyncio.sleep(5)
            writer.write(response(b"ok"))
            await writer.drain()
        finally:
            writer.close()

    async with serve(handler) as port, client(max_connections=1, pool_timeout=1.0) as http:
        url = f"http://127.0.0.1:{port}/"
        call = asyncio.create_task(http.post(url, content=b"hang"))
        await asyncio.sleep(0.1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # The only slot is free again, and the half-used connection is not handed out.
        assert (await http.post(url, content=b"next")).content == b"ok"
    assert connections == 2


async def test_chunked_and_informational_answers_and_connection_close() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
        for piece in (b"data: one\n\n", b"data: two\n\n"):
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async with serve(handler) as port, client() as http:
        for _ in range(2):
            answer = await http.get(f"http://127.0.0.1:{port}/")
            assert answer.status_code == 200 and answer.content == b"data: one\n\ndata: two\n\n"
    assert connections == 2  # `connection: close` is honoured: no reuse


async def test_keep_alive_reuses_one_connection() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1

        async def echo(headers: dict[str, str], body: bytes) -> bytes:
            return response(b"echo:" + body)

        await answer_each_request(reader, writer, echo)

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
        async def answer(headers: dict[str, str], body: bytes) -> bytes:
            return response(b"secure:" + body)

        await answer_each_request(reader, writer, answer)

    async with serve(handler, server_tls) as port:
        trusted = ssl.create_default_context(cafile=str(cert))
        async with client(verify=trusted) as http:
            for i in range(3):
                answer = await http.post(f"https://127.0.0.1:{port}/", content=str(i).encode())
                assert answer.content == f"secure:{i}".encode()
        async with client() as http:  # the system's trust store does not know this certificate
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.get(f"https://127.0.0.1:{port}/")
