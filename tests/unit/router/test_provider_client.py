"""The providers' HTTP client (httpx requests sent straight through the pooled transport),
against raw HTTP/1.1 servers on 127.0.0.1: what it sends, what it decodes, and that every
connection goes back to the pool whether a body is read whole, left early or never arrives."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from services.router.catalog import Provider
from services.router.providers.base import (
    ClientOptions,
    ProviderClient,
    SseEvent,
    SseReader,
    endpoint_url,
    make_client,
    sse_events,
)
from tests.unit.router.test_network import Handler, answer_each_request, read_request, response, serve


def provider(port: int) -> Provider:
    return Provider("local", "openai", f"http://127.0.0.1:{port}/v1", headers={"x-team": "agents"})


@asynccontextmanager
async def provider_client(
    handler: Handler, options: ClientOptions, headers: dict[str, str], path: str
) -> AsyncIterator[tuple[ProviderClient, httpx.URL, int]]:
    """A provider client for a raw server running `handler`, the URL of `path` on it, its port."""
    async with serve(handler) as port:
        client = make_client(provider(port), options, headers)
        try:
            yield client, endpoint_url(provider(port), path), port
        finally:
            await client.aclose()


async def test_sends_the_adapter_and_provider_headers_and_decodes_gzip() -> None:
    seen: list[dict[str, str]] = []
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1

        async def answer(headers: dict[str, str], body: bytes) -> bytes:
            seen.append({**headers, "body": body.decode()})
            packed = gzip.compress(json.dumps({"echo": body.decode()}).encode())
            return response(packed, "content-encoding: gzip\r\ncontent-type: application/json\r\n")

        await answer_each_request(reader, writer, answer)

    headers = {"authorization": "Bearer k"}
    async with provider_client(handler, ClientOptions(), headers, "/chat/completions") as (client, url, port):
        for i in range(3):
            answer = await client.post(url, content=f"{i}".encode())
            assert answer.status_code == 200
            assert answer.json() == {"echo": str(i)}  # decoded from gzip
            assert answer.request.url == url
    assert connections == 1  # one pooled connection served every call
    first = seen[0]
    assert first["authorization"] == "Bearer k" and first["x-team"] == "agents"
    assert first["accept-encoding"] == "gzip, deflate"
    assert first["user-agent"].startswith("ballast-router python-httpx/")
    assert first["host"] == f"127.0.0.1:{port}"
    assert [s["body"] for s in seen] == ["0", "1", "2"]


async def test_a_stream_left_early_gives_its_connection_back() -> None:
    """With one connection allowed, a second call only succeeds if leaving the first stream's
    block (before its body ended) closed that response and freed the slot."""
    calls = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        await read_request(reader)
        calls += 1
        if calls == 1:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await writer.drain()
            await asyncio.sleep(5)  # the rest never comes in time
        else:
            writer.write(response(b"second"))
            await writer.drain()
        writer.close()

    options = ClientOptions(max_connections=1, read_timeout=3.0)
    async with provider_client(handler, options, {}, "/x") as (client, url, _):
        async with client.stream(url, content=b"{}") as streamed:
            async for chunk in streamed.aiter_raw():
                assert chunk == b"first"
                break
        assert streamed.is_closed
        answer = await asyncio.wait_for(client.post(url, content=b"{}"), 2)
        assert answer.content == b"second"


async def test_a_silent_provider_is_a_read_timeout_and_frees_the_slot() -> None:
    silent = True

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if silent:
            await asyncio.sleep(5)
        else:
            writer.write(response(b"late but here"))
            await writer.drain()
        writer.close()

    options = ClientOptions(max_connections=1, read_timeout=0.2)
    async with provider_client(handler, options, {}, "/x") as (client, url, _):
        with pytest.raises(httpx.ReadTimeout):
            await client.post(url, content=b"{}")
        silent = False
        answer = await asyncio.wait_for(client.post(url, content=b"{}"), 2)
        assert answer.content == b"late but here"


async def test_a_stream_left_at_its_terminal_event_keeps_its_connection_when_the_end_has_arrived() -> None:
    """OpenAI's adapter stops reading at `data: [DONE]`; the chunked body's end, sent with it, is
    already in the socket's buffer then: the connection goes back to the pool, not closed (a new
    TCP connection per stream, on both sides). One still mid-body is closed (test above)."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1

        async def sse(headers: dict[str, str], body: bytes) -> bytes:
            events = b'data: {"n":1}\n\ndata: [DONE]\n\n'
            return (
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                + b"%x\r\n%s\r\n0\r\n\r\n" % (len(events), events)
            )

        await answer_each_request(reader, writer, sse)

    async with provider_client(handler, ClientOptions(), {}, "/chat/completions") as (client, url, _):
        for _ in range(3):
            async with client.stream(url, content=b"{}") as streamed:
                seen = []
                async for event in sse_events(streamed):
                    seen.append(event.data)
                    if event.data == "[DONE]":
                        break
            assert seen == ['{"n":1}', "[DONE]"]
    assert connections == 1


async def _events(*chunks: bytes) -> list[SseEvent]:
    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return [event async for event in SseReader(body())]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
async def test_server_sent_events_follow_the_whatwg_rules_in_any_framing(ending: bytes) -> None:
    text = (
        b": a comment" + ending
        + b"event: first" + ending
        + b"data: one" + ending
        + b"data:two" + ending  # no space after the colon
        + ending
        + b"data: caf\xc3\xa9 \xe2\x82\xac" + ending
        + ending + ending  # a blank line with no data dispatches nothing
        + b"id: 7" + ending  # fields Ballast does not use are ignored
        + b"data: last, without its blank line"
    )  # fmt: skip
    expected = [
        SseEvent("first", "one\ntwo"),
        SseEvent("message", "caf\u00e9 \u20ac"),
        SseEvent("message", "last, without its blank line"),
    ]
    assert await _events(text) == expected
    # Every way of cutting it into reads (a CRLF or a UTF-8 character split between two) reads the same.
    for cut in range(1, len(text)):
        assert await _events(text[:cut], text[cut:]) == expected, cut
    assert await _events(*[text[i : i + 1] for i in range(len(text))]) == expected


async def test_a_prepared_post_sends_what_an_httpx_request_would() -> None:
    """The provider client writes each URL's head once (Http11Transport.prepare_post): the bytes
    a server receives are the same request httpx builds, header for header, body for body."""
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                received.append(head + await reader.readexactly(length))
                writer.write(response(b"ok"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def parsed(raw: bytes) -> tuple[bytes, set[bytes], bytes]:
        head, _, body = raw.partition(b"\r\n\r\n")
        request_line, *fields = head.split(b"\r\n")
        return request_line, {f.lower() for f in fields}, body

    headers = {"authorization": "Bearer k", "content-type": "application/json"}
    async with provider_client(handler, ClientOptions(), headers, "/chat/completions?api-version=1") as (
        client,
        url,
        _,
    ):
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hé"}]}).encode()
        answer = await client.post(url, content=body)
        assert answer.status_code == 200 and answer.content == b"ok"
        assert answer.request.url == url and answer.request.method == "POST"
        # The same call through the generic transport path, with an httpx.Request.
        transport = client._transport
        request = httpx.Request("POST", url, headers=client._headers, content=body)
        generic = await transport.handle_async_request(request)
        await generic.aread()
        await generic.aclose()
    assert len(received) == 2
    assert parsed(received[0]) == parsed(received[1])
    assert parsed(received[0])[0] == b"POST /v1/chat/completions?api-version=1 HTTP/1.1"


async def test_a_header_that_would_inject_a_line_is_refused_before_anything_is_sent() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    bad = {"authorization": "Bearer k\r\nx-injected: 1"}
    async with provider_client(handler, ClientOptions(), bad, "/chat/completions") as (client, url, _):
        with pytest.raises(httpx.LocalProtocolError, match="invalid header b'authorization'"):
            await client.post(url, content=b"{}")
    assert connections == 0


async def test_a_response_head_over_the_configured_limit_is_refused() -> None:
    big = "x" * 3000

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def answer(headers: dict[str, str], body: bytes) -> bytes:
            return response(b"{}", f"x-big: {big}\r\n")

        await answer_each_request(reader, writer, answer)

    roomy = ClientOptions()  # 16 KiB by default: the 3 KB header passes
    async with provider_client(handler, roomy, {}, "/chat/completions") as (client, url, _):
        assert (await client.post(url, content=b"{}")).headers["x-big"] == big
    tight = ClientOptions(max_response_head_bytes=2048)  # BALLAST_ROUTER_MAX_RESPONSE_HEAD_BYTES
    async with provider_client(handler, tight, {}, "/chat/completions") as (client, url, _):
        with pytest.raises(httpx.RemoteProtocolError, match="over 2048 bytes"):
            await client.post(url, content=b"{}")
