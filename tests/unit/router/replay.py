"""Replays recorded provider answers (tests/unit/router/data/replay/) over real HTTP on 127.0.0.1.

A transcript is an HTTP response as the provider sends it: status line, headers, a blank line,
then the body byte for byte (JSON, or SSE exactly as framed). Lines of the head are written with
`\\n` in the file and sent with CRLF. Two kinds of placeholders are filled in at send time:
`{{now+30s}}` (an RFC 3339 time that many seconds from now, for Anthropic's reset headers) and
`{{header:NAME}}` (the request's header, for providers that echo what they were sent).

Delivery: the body goes out whole with content-length, or in `chunk` byte pieces with chunked
transfer encoding (each piece written and drained on its own), optionally gzip-compressed first.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

DATA = Path(__file__).parent / "data" / "replay"
_NOW = re.compile(rb"\{\{now\+(\d+)s\}\}")
_HEADER = re.compile(rb"\{\{header:([a-z0-9-]+)\}\}")


def transcript(name: str) -> bytes:
    return (DATA / name).read_bytes()


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Delivery:
    # Bytes per chunk of the body; 0 sends it whole with content-length.
    chunk: int = 0
    gzip: bool = False


@dataclass
class ReplayServer:
    """Answers the n-th request with the n-th transcript (the last one repeats)."""

    transcripts: list[bytes]
    delivery: Delivery = field(default_factory=Delivery)
    requests: list[Request] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> ReplayServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                request = await _read_request(reader)
                self.requests.append(request)
                index = min(len(self.requests), len(self.transcripts)) - 1
                await self._answer(writer, _fill(self.transcripts[index], request))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, raw: bytes) -> None:
        head, _, body = raw.partition(b"\n\n")
        lines = head.decode().split("\n")
        if self.delivery.gzip:
            body = gzip.compress(body)
            lines.append("content-encoding: gzip")
        if self.delivery.chunk:
            lines.append("transfer-encoding: chunked")
        else:
            lines.append(f"content-length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        if not self.delivery.chunk:
            writer.write(body)
            await writer.drain()
            return
        await writer.drain()
        for start in range(0, len(body), self.delivery.chunk):
            piece = body[start : start + self.delivery.chunk]
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def _read_request(reader: asyncio.StreamReader) -> Request:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    first, *rest = head.rstrip("\r\n").split("\r\n")
    method, path, _ = first.split(" ", 2)
    headers = {}
    for line in rest:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Request(method, path, headers, body)


def _fill(raw: bytes, request: Request) -> bytes:
    def at(match: re.Match[bytes]) -> bytes:
        moment = datetime.fromtimestamp(time.time() + int(match.group(1)), UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ").encode()

    raw = _NOW.sub(at, raw)
    return _HEADER.sub(lambda m: request.headers.get(m.group(1).decode(), "").encode(), raw)
