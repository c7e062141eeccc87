"""HTTP/1.1 for the provider transport's client side, without I/O: a request's head and body
written, a response read incrementally (network.py does the socket work).

It replaced h11 there. h11 is a general state machine for both ends of a connection: every
header it sends or receives goes through its own regular expressions, and every event fires
state transitions. On a small provider call that was about three quarters of the transport's
CPU (bench/results/provider_transport.md), paid on every call the router makes. What a client
of provider APIs needs is smaller:

- requests: a request line and headers checked once (a name must be a token, a value may not
  hold a line break, so no header can be injected), the body framed by the request's own
  Content-Length (exactly that many bytes) or chunked when it says `transfer-encoding: chunked`;
- responses (RFC 9112): a status line `HTTP/1.0` or `HTTP/1.1` and header fields checked with
  one expression over the whole head (line folding joined, bare LF line ends accepted);
  informational (1xx) answers skipped; the body framed by Transfer-Encoding (chunked, with
  extensions and trailers), else Content-Length (repeated values must agree), else by the
  connection's close; 204 and 304 and answers to HEAD have none;
- keep-alive: HTTP/1.1 unless `connection: close`; never after an HTTP/1.0 answer (as h11 did:
  its keep-alive extension is optional, and no provider API answers in HTTP/1.0), a body read to
  the close, or one framed by both Transfer-Encoding and Content-Length.

Anything else from the server (a malformed head, a head over `max_head_bytes`, a body cut off)
raises `ProtocolError`; a request that cannot be written raises `LocalProtocolError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

# What h11 allowed by default for a response head (and a chunk's size line, or trailers); the
# router sets it from BALLAST_ROUTER_MAX_RESPONSE_HEAD_BYTES.
MAX_HEAD_BYTES: Final = 16 * 1024


class ProtocolError(Exception):
    """The server's bytes are not a well-formed HTTP/1.1 response (or stop before its end)."""


class LocalProtocolError(Exception):
    """The request cannot be written as HTTP/1.1 (a bad header, or a body its framing forbids)."""


class _Marker:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


# Events besides a `Response` (the head) and `bytes` (a piece of the body).
NEED_DATA: Final = _Marker("NEED_DATA")  # nothing more to tell until more bytes arrive
END: Final = _Marker("END")  # the response is complete
CLOSED: Final = _Marker("CLOSED")  # the server closed before sending any response


@dataclass(frozen=True, slots=True)
class Response:
    status_code: int
    reason: bytes
    # As received (names as the server spelled them), folded lines joined.
    headers: list[tuple[bytes, bytes]]
    http_version: bytes  # b"1.1" or b"1.0"


_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"
# A head's field lines after the status line, each ending in LF (CRs already removed); a line
# that starts with a space or tab continues the one before (obsolete line folding).
_FIELD_LINES = re.compile(rb"(?:(?:" + _TOKEN + rb":|[ \t])" + _VALUE + rb"\n)*")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: (" + _VALUE + rb"))?")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_METHOD = re.compile(_TOKEN)
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")

# Reading states.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestHead:
    data: bytes  # request line, header lines and the blank line
    # The body's framing: its exact length, or None when it is sent chunked.
    content_length: int | None
    # False when the request says `connection: close`.
    keep_alive: bool = True


def request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> RequestHead:
    """The head of a request with these headers, which must frame any body themselves
    (Content-Length, or `transfer-encoding: chunked`; neither means no body)."""
    if _METHOD.fullmatch(method) is None:
        raise LocalProtocolError(f"invalid method {method!r}")
    if _TARGET.fullmatch(target) is None:
        raise LocalProtocolError(f"invalid request target {target!r}")
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    length: int | None = 0
    keep_alive = True
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
        lowered = name.lower()
        if lowered == b"connection":
            keep_alive = keep_alive and b"close" not in _tokens([value])
        elif lowered == b"content-length":
            if not value.isdigit():
                raise LocalProtocolError(f"invalid content-length {value!r}")
            length = int(value)
        elif lowered == b"transfer-encoding":
            if value.lower() != b"chunked":
                raise LocalProtocolError(f"unsupported transfer-encoding {value!r}")
            length = None
    fields = b"".join(parts[4:])
    # One line per header, each a token and a value without line breaks or NULs: a value that
    # held a line break would have made two lines (or an invalid one).
    if _FIELD_LINES.fullmatch(fields.replace(b"\r\n", b"\n")) is None or fields.count(b"\n") != len(headers):
        bad = next(
            (n for n, v in headers if _METHOD.fullmatch(n) is None or re.fullmatch(_VALUE, v) is None),
            headers[0][0] if headers else b"",
        )
        raise LocalProtocolError(f"invalid header {bad!r}")
    if any(name[:1] in (b" ", b"\t") for name, _ in headers):
        raise LocalProtocolError("a header name may not start with white space")
    parts.append(b"\r\n")
    return RequestHead(b"".join(parts), length, keep_alive)


class BodyWriter:
    """Frames a request body as its head said: checks a fixed length, or chunks it."""

    def __init__(self, content_length: int | None) -> None:
        self._left = content_length
        self._chunked = content_length is None

    def data(self, chunk: bytes) -> bytes:
        if self._chunked:
            return b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunk else b""
        assert self._left is not None
        if len(chunk) > self._left:
            raise LocalProtocolError("the request body is longer than its content-length")
        self._left -= len(chunk)
        return chunk

    def end(self) -> bytes:
        if self._chunked:
            return b"0\r\n\r\n"
        if self._left:
            raise LocalProtocolError(f"the request body is {self._left} bytes short of its content-length")
        return b""


# --- responses ----------------------------------------------------------------------------------


def _tokens(values: list[bytes]) -> list[bytes]:
    """The comma-separated list elements of header values, lower-cased and trimmed."""
    return [
        item.strip(b" \t").lower() for value in values for item in value.split(b",") if item.strip(b" \t")
    ]


class ResponseReader:
    """One connection's responses, read from the bytes given to `receive` (b"" is the end of
    the stream). `next_event` returns a `Response` first, then `bytes` pieces of its body, then
    `END`; `NEED_DATA` whenever it needs more bytes."""

    def __init__(self, max_head_bytes: int = MAX_HEAD_BYTES) -> None:
        self._max_head = max_head_bytes
        self._buffer = bytearray()
        self._eof = False
        self._state = _HEAD
        self._left = 0  # of the body (content-length) or of the current chunk
        self._no_body = False  # the request was HEAD: its answer has no body
        self._trailer_bytes = 0
        # Whether the connection may carry another request once this response is complete.
        self.keep_alive = True

    @property
    def complete(self) -> bool:
        """The whole response has been read."""
        return self._state == _DONE

    @property
    def unread(self) -> int:
        """Bytes received and not yet returned in an event."""
        return len(self._buffer)

    def receive(self, data: bytes) -> None:
        if data:
            self._buffer += data
        else:
            self._eof = True

    def start(self, *, head_request: bool = False) -> None:
        """Expects the response to a new request on this connection (after one that completed
        and allowed keep-alive)."""
        if self._state != _DONE and self._state != _HEAD:
            raise LocalProtocolError("the previous response is not complete")
        self._state = _HEAD
        self._no_body = head_request

    def next_event(self) -> Response | bytes | _Marker:
        while True:
            state = self._state
            if state == _LENGTH:
                return self._counted(_DONE)
            if state == _HEAD:
                event = self._head()
                if event is None:  # an informational answer, skipped
                    continue
                return event
            if state == _CHUNK_DATA:
                return self._counted(_CHUNK_END)
            if state == _CHUNK_SIZE:
                if not self._chunk_size():
                    return NEED_DATA
                continue
            if state == _CHUNK_END:
                if not self._chunk_end():
                    return NEED_DATA
                continue
            if state == _TRAILERS:
                if not self._trailer_line():
                    return NEED_DATA
                continue
            if state == _UNTIL_CLOSE:
                if self._buffer:
                    return self._take(len(self._buffer))
                if self._eof:
                    self._state = _DONE
                    return END
                return NEED_DATA
            return END  # _DONE

    # --- the states ---
    def _take(self, size: int) -> bytes:
        piece = bytes(self._buffer[:size])
        del self._buffer[:size]
        return piece

    def _cut_off(self, what: str) -> ProtocolError:
        return ProtocolError(f"the provider closed the connection in the middle of {what}")

    def _counted(self, then: int) -> bytes | _Marker:
        """A piece of a body or chunk of known length (more than 0 bytes left), then `then`."""
        if self._buffer:
            piece = self._take(min(self._left, len(self._buffer)))
            self._left -= len(piece)
            if self._left == 0:
                self._state = then
            return piece
        if self._eof:
            raise self._cut_off(f"the response body ({self._left} bytes missing)")
        return NEED_DATA

    def _head(self) -> Response | _Marker | None:
        buffer = self._buffer
        found = _HEAD_END.search(buffer)
        if found is None:
            if len(buffer) > self._max_head:
                raise ProtocolError(f"the response head is over {self._max_head} bytes")
            if self._eof:
                if buffer:
                    raise self._cut_off("the response head")
                return CLOSED
            return NEED_DATA
        if found.end() > self._max_head:
            raise ProtocolError(f"the response head is over {self._max_head} bytes")
        head = bytes(buffer[: found.start()]).replace(b"\r\n", b"\n")
        del buffer[: found.end()]
        status_line, _, fields = head.partition(b"\n")
        matched = _STATUS_LINE.fullmatch(status_line)
        if matched is None:
            raise ProtocolError(f"not an HTTP/1.1 status line: {status_line[:100]!r}")
        if fields:
            fields += b"\n"
            if fields[:1] in (b" ", b"\t") or _FIELD_LINES.fullmatch(fields) is None:
                raise ProtocolError("malformed header field in the response")
        headers: list[tuple[bytes, bytes]] = []
        for line in fields.split(b"\n")[:-1]:
            if line[:1] in (b" ", b"\t"):  # folded: part of the value before
                name, value = headers[-1]
                headers[-1] = (name, (value + b" " + line.strip(b" \t")).strip(b" "))
                continue
            name, _, value = line.partition(b":")
            headers.append((name, value.strip(b" \t")))
        status = int(matched[2])
        if status < 200:
            if status == 101:
                raise ProtocolError("unexpected 101 Switching Protocols")
            return None
        version = b"1." + matched[1]
        self._frame(status, version, headers)
        return Response(status, matched[3] or b"", headers, version)

    def _frame(self, status: int, version: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """Sets how the body is delimited (RFC 9112 section 6.3) and whether to keep the
        connection."""
        connection: list[bytes] = []
        encodings: list[bytes] = []
        lengths: list[bytes] = []
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"connection":
                connection.append(value)
            elif lowered == b"transfer-encoding":
                encodings.append(value)
            elif lowered == b"content-length":
                lengths.append(value)
        self.keep_alive = version == b"1.1" and (not connection or b"close" not in _tokens(connection))
        if self._no_body or status in (204, 304):
            self._state = _DONE
            return
        if encodings:
            if lengths:
                self.keep_alive = False  # both: the length is ignored, and the connection not reused
            codings = _tokens(encodings)
            if codings and codings[-1] == b"chunked":
                self._state = _CHUNK_SIZE
            else:
                self._state = _UNTIL_CLOSE
                self.keep_alive = False
            return
        if lengths:
            values = set(_tokens(lengths))
            if len(values) != 1:
                raise ProtocolError(f"conflicting content-length values {sorted(values)!r}")
            (value,) = values
            if not value.isdigit() or len(value) > 18:
                raise ProtocolError(f"invalid content-length {value[:40]!r}")
            self._left = int(value)
            self._state = _LENGTH if self._left else _DONE
            return
        self._state = _UNTIL_CLOSE
        self.keep_alive = False

    def _line(self, what: str) -> bytes | None:
        """The next line (without its line end), or None until one has arrived."""
        buffer = self._buffer
        end = buffer.find(b"\n")
        if end < 0:
            if len(buffer) > self._max_head:
                raise ProtocolError(f"{what} is over {self._max_head} bytes")
            if self._eof:
                raise self._cut_off(what)
            return None
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        return line[:-1] if line.endswith(b"\r") else line

    def _chunk_size(self) -> bool:
        line = self._line("a chunk's size line")
        if line is None:
            return False
        size = line.split(b";", 1)[0].strip(b" \t")
        if _HEX.fullmatch(size) is None:
            raise ProtocolError(f"invalid chunk size {line[:40]!r}")
        self._left = int(size, 16)
        if self._left == 0:
            self._state = _TRAILERS
            self._trailer_bytes = 0
        else:
            self._state = _CHUNK_DATA
        return True

    def _chunk_end(self) -> bool:
        buffer = self._buffer
        if buffer[:2] == b"\r\n":
            del buffer[:2]
        elif buffer[:1] == b"\n":
            del buffer[:1]
        elif buffer == b"\r" or not buffer:
            if self._eof:
                raise self._cut_off("a chunked body")
            return False
        else:
            raise ProtocolError("a chunk's data is not followed by a line end")
        self._state = _CHUNK_SIZE
        return True

    def _trailer_line(self) -> bool:
        line = self._line("the trailers")
        if line is None:
            return False
        if not line:
            self._state = _DONE
            return True
        self._trailer_bytes += len(line) + 2
        if self._trailer_bytes > self._max_head:
            raise ProtocolError(f"the trailers are over {self._max_head} bytes")
        if _FIELD_LINES.fullmatch(line + b"\n") is None:
            raise ProtocolError("malformed trailer field in the response")
        return True  # trailers are read and dropped: nothing in a provider's answer needs them
