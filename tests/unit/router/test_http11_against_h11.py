"""The router's HTTP/1.1 codec (http11.py) read side by side with h11, the parser it replaced
(still installed: httpx's default transport uses it): a few hundred seeded random responses, every
framing and keep-alive variant, cut into random pieces, must give the same status, headers, body
and reuse decision from both. Random corruptions of them must fail only with ProtocolError, and
a stream that ends must never leave the reader waiting for more. Random requests the codec writes
(fixed length or chunked) must reach h11, as a server, as written."""

from __future__ import annotations

import contextlib
import random

import h11
import pytest

from services.router.providers import http11

_NAMES = [
    b"Content-Type",
    b"x-request-id",
    b"X-RateLimit-Remaining-Requests",
    b"retry-after",
    b"server",
    b"vary",
]
_VALUE_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -_.,;=/:\"'()\t\xe9\xff"


def _value(rng: random.Random) -> bytes:
    text = bytes(rng.choice(_VALUE_CHARS) for _ in range(rng.randint(1, 30))).strip(b" ")
    return text or b"v"


def random_response(rng: random.Random) -> tuple[bytes, bytes]:
    """An HTTP/1.1 or 1.0 response on the wire, and its body."""
    version = rng.choice([b"1.1", b"1.1", b"1.1", b"1.0"])
    status = rng.choice([200, 200, 201, 204, 304, 400, 404, 429, 500, 503])
    headers = [(rng.choice(_NAMES), _value(rng)) for _ in range(rng.randint(0, 6))]
    body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 17, 300, 5000])))
    framing = rng.choice(["length", "chunked", "close"])
    if version == b"1.0" and framing == "chunked":
        framing = "length"
    connection = rng.choice([None, b"close", b"keep-alive", b"Keep-Alive, Upgrade"])
    if connection is not None:
        headers.append((b"Connection", connection))
    if status in (204, 304):
        body = b""
        framing = "none"
    if framing == "length":
        headers.append((rng.choice([b"Content-Length", b"content-length"]), str(len(body)).encode()))
        encoded = body
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        pieces, at = [], 0
        while at < len(body):
            size = rng.randint(1, 700)
            ext = rng.choice([b"", b";a=b", b"; name"])
            pieces.append(b"%x%b\r\n%b\r\n" % (len(body[at : at + size]), ext, body[at : at + size]))
            at += size
        trailers = b"x-trailer: 1\r\n" if rng.random() < 0.3 else b""
        encoded = b"".join(pieces) + b"0\r\n" + trailers + b"\r\n"
    else:
        encoded = body
    rng.shuffle(headers)
    informational = b"HTTP/1.1 100 Continue\r\n\r\n" if rng.random() < 0.1 and version == b"1.1" else b""
    head = b"HTTP/%b %d %b\r\n" % (version, status, rng.choice([b"OK", b"Whatever It Says", b""]))
    head += b"".join(b"%b: %b\r\n" % (n, v) for n, v in headers)
    return informational + head + b"\r\n" + encoded, body


def _pieces(wire: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted({rng.randrange(len(wire) + 1) for _ in range(rng.randint(0, 8))})
    return [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True) if wire[a:b]]


def read_with_ours(pieces: list[bytes]) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
    reader = http11.ResponseReader()
    reader.start()
    status, headers, body = 0, [], b""
    for piece in [*pieces, b""]:
        reader.receive(piece)
        while True:
            event = reader.next_event()
            if isinstance(event, http11.Response):
                status, headers = event.status_code, [(n.lower(), v) for n, v in event.headers]
            elif isinstance(event, bytes):
                body += event
            else:
                break
        if event is http11.END:
            # Reusable: the answer ended before the stream did, and keeps the connection.
            return status, headers, body, bool(piece) and reader.keep_alive
        assert event is http11.NEED_DATA, event
    raise AssertionError("the reader still waits after the end of the stream")


def read_with_h11(pieces: list[bytes]) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method="GET", target="/", headers=[("Host", "example")]))
    connection.send(h11.EndOfMessage())
    status, headers, body = 0, [], b""
    for piece in [*pieces, b""]:
        connection.receive_data(piece)
        while True:
            event = connection.next_event()
            if type(event) is h11.Response:
                status, headers = event.status_code, list(event.headers)
            elif type(event) is h11.Data:
                body += bytes(event.data)
            elif type(event) is h11.EndOfMessage:
                return status, headers, body, bool(piece) and connection.their_state is h11.DONE
            elif event is h11.NEED_DATA:
                break
            # InformationalResponse: skipped, as ours does
    raise AssertionError("h11 still waits after the end of the stream")


@pytest.mark.parametrize("seed", range(300))
def test_random_responses_read_the_same_as_with_h11(seed: int) -> None:
    rng = random.Random(seed)
    wire, body = random_response(rng)
    pieces = _pieces(wire, rng)
    ours = read_with_ours(pieces)
    assert ours == read_with_h11(pieces)
    assert ours[2] == body


@pytest.mark.parametrize("seed", range(300))
def test_corrupted_responses_fail_only_as_protocol_errors(seed: int) -> None:
    rng = random.Random(10_000 + seed)
    wire = bytearray(random_response(rng)[0])
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(wire))
        action = rng.choice(["flip", "drop", "insert"])
        if action == "flip":
            wire[at] = rng.randrange(256)
        elif action == "drop":
            del wire[at]
        else:
            wire[at:at] = bytes([rng.choice(b"\r\n:; \x00\x7fa0")])
    # Refused is fine; any other exception (or waiting for ever) fails the test.
    with contextlib.suppress(http11.ProtocolError):
        read_with_ours(_pieces(bytes(wire), rng))


@pytest.mark.parametrize("seed", range(100))
def test_random_requests_are_read_by_h11_as_written(seed: int) -> None:
    rng = random.Random(20_000 + seed)
    body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 5, 900, 70_000])))
    headers = [
        (b"Host", b"api.example.com"),
        *((rng.choice(_NAMES), _value(rng)) for _ in range(rng.randint(0, 5))),
    ]
    chunked = rng.random() < 0.3
    headers.append(
        (b"Transfer-Encoding", b"chunked") if chunked else (b"Content-Length", str(len(body)).encode())
    )
    target = rng.choice(
        [b"/v1/chat/completions", b"/openai/deployments/gpt/chat/completions?api-version=2024-10-21"]
    )
    head = http11.request_head(b"POST", target, headers)
    writer = http11.BodyWriter(head.content_length)
    pieces = [body[i : i + 4096] for i in range(0, len(body), 4096)]
    wire = head.data + b"".join(writer.data(piece) for piece in pieces) + writer.end()

    server = h11.Connection(h11.SERVER)
    server.receive_data(wire)
    request = server.next_event()
    assert type(request) is h11.Request
    assert (request.method, request.target) == (b"POST", target)
    # Receivers drop white space around a value (RFC 9110 5.5); the rest arrives as written.
    assert list(request.headers) == [(name.lower(), value.strip(b" \t")) for name, value in headers]
    received = b""
    while type(event := server.next_event()) is h11.Data:
        received += bytes(event.data)
    assert type(event) is h11.EndOfMessage and received == body
