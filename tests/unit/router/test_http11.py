"""The provider transport's HTTP/1.1 reader and writer (http11.py), without sockets: responses
framed every way RFC 9112 allows, fed whole and one byte at a time; malformed, oversized and
cut-off responses refused with ProtocolError; requests whose headers could inject a line or
whose bodies break their framing refused before a byte is written."""

from __future__ import annotations

import pytest

from services.router.providers import http11


def read_all(
    wire: bytes, *, byte_by_byte: bool = False, eof: bool = True, head_request: bool = False
) -> tuple[http11.Response | None, bytes, http11.ResponseReader]:
    """Feeds `wire` (then the end of the stream, if `eof`) and returns the head, the body and
    the reader (whose state tells whether the connection may be reused)."""
    reader = http11.ResponseReader(max_head_bytes=1024)
    reader.start(head_request=head_request)
    pieces = [wire[i : i + 1] for i in range(len(wire))] if byte_by_byte else [wire]
    head: http11.Response | None = None
    body = b""
    for piece in [*pieces, *([b""] if eof else [])]:
        reader.receive(piece)
        while True:
            event = reader.next_event()
            if event is http11.NEED_DATA or event is http11.END:
                break
            if isinstance(event, http11.Response):
                assert head is None
                head = event
            elif isinstance(event, bytes):
                body += event
            else:
                raise AssertionError(event)
        if event is http11.END:
            break
    return head, body, reader


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_a_content_length_body_is_read_exactly_and_the_connection_kept(byte_by_byte: bool) -> None:
    wire = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 7\r\n\r\n{"a":1}'
    head, body, reader = read_all(wire, byte_by_byte=byte_by_byte, eof=False)
    assert head == http11.Response(
        200, b"OK", [(b"Content-Type", b"application/json"), (b"content-length", b"7")], b"1.1"
    )
    assert body == b'{"a":1}'
    assert reader.complete and reader.keep_alive and reader.unread == 0


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_chunked_bodies_with_extensions_and_trailers_after_an_informational_answer(
    byte_by_byte: bool,
) -> None:
    wire = (
        b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n"
        b"1\r\n \r\n"
        b"5\r\nworld\r\n"
        b"0\r\nx-trailer: 1\r\n\r\n"
    )
    head, body, reader = read_all(wire, byte_by_byte=byte_by_byte, eof=False)
    assert head is not None and head.status_code == 200
    assert body == b"hello world"
    assert reader.complete and reader.keep_alive


def test_the_next_response_on_the_same_connection_starts_clean() -> None:
    reader = http11.ResponseReader()
    reader.start()
    reader.receive(b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    first = reader.next_event()
    assert isinstance(first, http11.Response) and first.status_code == 204
    assert reader.next_event() is http11.END and reader.complete
    reader.start()
    second = reader.next_event()
    assert isinstance(second, http11.Response) and second.status_code == 200
    assert reader.next_event() == b"ok" and reader.next_event() is http11.END


def test_line_folding_and_bare_line_feeds_are_read() -> None:
    wire = b"HTTP/1.1 200 OK\nx-long: one\n  two\ncontent-length: 2\n\nok"
    head, body, _ = read_all(wire, eof=False)
    assert head is not None and (b"x-long", b"one two") in head.headers and body == b"ok"


def test_a_body_read_to_the_close_is_complete_at_the_close_and_not_kept() -> None:
    head, body, reader = read_all(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    assert head is not None and body == b"all of it" and reader.complete and not reader.keep_alive


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",
        # Both framings: the length is ignored and the connection must not carry another request.
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ],
)
def test_answers_that_end_the_connection_are_not_kept(wire: bytes) -> None:
    _, _, reader = read_all(wire, eof=False)
    assert reader.complete and not reader.keep_alive


def test_an_http_1_0_answer_is_not_kept_even_with_keep_alive() -> None:
    wire = b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 0\r\n\r\n"
    _, _, reader = read_all(wire, eof=False)
    assert reader.complete and not reader.keep_alive


@pytest.mark.parametrize("status", [204, 304])
def test_no_content_and_not_modified_have_no_body_whatever_the_length_says(status: int) -> None:
    head, body, reader = read_all(f"HTTP/1.1 {status} X\r\ncontent-length: 5\r\n\r\n".encode(), eof=False)
    assert head is not None and head.status_code == status and body == b"" and reader.complete


def test_an_answer_to_head_has_no_body() -> None:
    head, body, reader = read_all(
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", eof=False, head_request=True
    )
    assert head is not None and body == b"" and reader.complete and reader.keep_alive


def test_a_close_before_any_answer_is_told_apart_from_a_cut_off_head() -> None:
    reader = http11.ResponseReader()
    reader.receive(b"")
    assert reader.next_event() is http11.CLOSED
    with pytest.raises(http11.ProtocolError, match="middle of the response head"):
        read_all(b"HTTP/1.1 200 OK\r\ncontent-")


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", "10 bytes missing|5 bytes missing"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel", "middle of"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n", "middle of"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\nx: 1\r\n", "middle of the trailers"),
    ],
)
def test_a_body_cut_off_by_the_close_is_an_error_not_an_answer(wire: bytes, message: str) -> None:
    with pytest.raises(http11.ProtocolError, match=message):
        read_all(wire)


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"HTTP/2 200 OK\r\n\r\n", "not an HTTP/1.1 status line"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "not an HTTP/1.1 status line"),
        (b"ICY 200 OK\r\n\r\n", "not an HTTP/1.1 status line"),
        (b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nx y: 1\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nx: a\x00b\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\n folded: first\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\nx", "conflicting content-length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nxyz", "conflicting"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", "invalid content-length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0x10\r\n\r\n", "invalid content-length"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", "invalid chunk size"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nokX\r\n", "not followed by a line end"),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n",
            "malformed trailer",
        ),
        (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n", "unexpected 101"),
    ],
)
def test_malformed_answers_are_refused(wire: bytes, message: str) -> None:
    with pytest.raises(http11.ProtocolError, match=message):
        read_all(wire)


def test_a_head_or_chunk_line_over_the_limit_is_refused_before_it_ends() -> None:
    # The limit holds even while the head has not ended: memory stays bounded.
    with pytest.raises(http11.ProtocolError, match="over 1024 bytes"):
        read_all(b"HTTP/1.1 200 OK\r\nx: " + b"a" * 2000, eof=False)
    with pytest.raises(http11.ProtocolError, match="over 1024 bytes"):
        read_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1;" + b"e" * 2000, eof=False)
    trailers = b"".join(b"x-%d: %s\r\n" % (i, b"v" * 90) for i in range(20))
    with pytest.raises(http11.ProtocolError, match="trailers are over 1024 bytes"):
        read_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n" + trailers + b"\r\n")


def test_a_request_head_is_written_with_its_framing() -> None:
    head = http11.request_head(
        b"POST", b"/v1/chat/completions?x=1", [(b"Host", b"example.com"), (b"content-length", b"5")]
    )
    assert head.data == (
        b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: example.com\r\ncontent-length: 5\r\n\r\n"
    )
    assert head.content_length == 5 and head.keep_alive
    assert http11.request_head(b"GET", b"/", [(b"Host", b"h")]).content_length == 0
    chunked = http11.request_head(b"POST", b"/", [(b"Transfer-Encoding", b"chunked")])
    assert chunked.content_length is None
    assert not http11.request_head(b"GET", b"/", [(b"Connection", b"close")]).keep_alive


@pytest.mark.parametrize(
    ("method", "target", "headers", "message"),
    [
        (b"POST", b"/", [(b"x-key", b"secret\r\nx-injected: 1")], "invalid header b'x-key'"),
        (b"POST", b"/", [(b"x-key", b"a\nb")], "invalid header"),
        (b"POST", b"/", [(b"x-key", b"a\rb")], "invalid header"),
        (b"POST", b"/", [(b"x-key", b"a\x00b")], "invalid header"),
        (b"POST", b"/", [(b"x key", b"v")], "invalid header b'x key'"),
        (b"POST", b"/", [(b"", b"v")], "invalid header"),
        (b"POST", b"/", [(b" x", b"v")], "invalid header|white space"),
        (b"POST", b"/a b", [], "invalid request target"),
        (b"POST", b"/a\r\nx: 1", [], "invalid request target"),
        (b"PO ST", b"/", [], "invalid method"),
        (b"POST", b"/", [(b"content-length", b"-1")], "invalid content-length"),
        (b"POST", b"/", [(b"transfer-encoding", b"gzip")], "unsupported transfer-encoding"),
    ],
)
def test_requests_that_could_inject_or_misframe_are_refused(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], message: str
) -> None:
    with pytest.raises(http11.LocalProtocolError, match=message):
        http11.request_head(method, target, headers)


def test_a_body_must_match_its_framing() -> None:
    exact = http11.BodyWriter(5)
    assert exact.data(b"hel") + exact.data(b"lo") + exact.end() == b"hello"
    with pytest.raises(http11.LocalProtocolError, match="longer than its content-length"):
        http11.BodyWriter(2).data(b"abc")
    short = http11.BodyWriter(5)
    short.data(b"abc")
    with pytest.raises(http11.LocalProtocolError, match="2 bytes short"):
        short.end()
    with pytest.raises(http11.LocalProtocolError, match="longer"):
        http11.BodyWriter(0).data(b"x")  # no framing header: no body
    chunked = http11.BodyWriter(None)
    assert chunked.data(b"hello") + chunked.data(b"") + chunked.end() == b"5\r\nhello\r\n0\r\n\r\n"
