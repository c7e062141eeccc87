"""What every adapter shares: the error taxonomy, rate-limit headers, SSE framing, the httpx client."""

from __future__ import annotations

import contextlib
import enum
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import httpx
import orjson

from services.router.catalog import Model, Provider
from services.router.model import ChatRequest, ChatResult, Delta, EmbedResult
from services.router.providers.http11 import MAX_HEAD_BYTES
from services.router.providers.network import Http11Transport, PreparedPost


class Outcome(enum.Enum):
    OK = "ok"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    CLIENT_ERROR = "client_error"
    BREAKER_OPEN = "breaker_open"
    PROTOCOL_ERROR = "protocol_error"
    # The provider refused the router's key (invalid, revoked, no permission): it leaves rotation.
    AUTH_ERROR = "auth_error"
    # The provider's account is out of credit (OpenAI insufficient_quota, Anthropic billing): it
    # leaves rotation too; waiting seconds will not help.
    QUOTA_EXHAUSTED = "quota_exhausted"
    # Skipped without a call: the provider is out of rotation after one of the two above.
    OUT_OF_ROTATION = "out_of_rotation"


# Outcomes after which a provider (every model behind its key) is taken out of rotation.
OUT_OF_ROTATION_OUTCOMES = frozenset({Outcome.AUTH_ERROR, Outcome.QUOTA_EXHAUSTED})


class ProviderError(Exception):
    """One failed attempt. `caller_fault` marks the caller's own mistakes (never retried).

    `message` may reach callers (attempt trails, status messages): it is Ballast's summary, never
    the provider's raw words (see errors.py). `category` is the summary's category and `field` the
    request field the provider named, if any."""

    def __init__(
        self,
        outcome: Outcome,
        message: str,
        *,
        http_status: int = 0,
        retry_after: float | None = None,
        caller_fault: bool = False,
        category: str = "",
        field: str = "",
    ) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message
        self.http_status = http_status
        self.retry_after = retry_after
        self.caller_fault = caller_fault
        self.category = category
        self.field = field


@dataclass(frozen=True)
class Headroom:
    """Rate-limit state as the provider's headers reported it; -1 / None when not reported."""

    remaining_requests: int = -1
    remaining_tokens: int = -1
    limit_requests: int = -1
    limit_tokens: int = -1
    reset_requests: float | None = None
    reset_tokens: float | None = None
    observed_at: float = 0.0  # wall-clock seconds
    retry_after: float | None = None
    rate_limited: bool = False


# Called with (model, status, headers) after every HTTP response, success or not.
HeadersSink = Callable[[Model, int, Headroom | None], None]


class Adapter(Protocol):
    provider: Provider

    async def complete(self, model: Model, request: ChatRequest) -> ChatResult: ...

    def stream(self, model: Model, request: ChatRequest) -> AsyncIterator[Delta | ChatResult]:
        """Deltas as they come, then exactly one ChatResult with the assembled answer."""
        ...

    async def embed(self, model: Model, inputs: list[str]) -> EmbedResult: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class ClientOptions:
    connect_timeout: float = 3.0
    # Longest wait for one read; the router caps whole attempts with the caller's deadline.
    read_timeout: float = 60.0
    max_connections: int = 200
    max_response_head_bytes: int = MAX_HEAD_BYTES
    default_max_output_tokens: int = 4096
    # Longest wait a provider's rate-limit reset time may impose when it sent no retry-after.
    max_reset_wait: float = 60.0


def build_adapter(provider: Provider, options: ClientOptions, sink: HeadersSink) -> Adapter:
    from services.router.providers.anthropic import AnthropicAdapter
    from services.router.providers.openai import OpenAIAdapter

    if provider.wire == "anthropic":
        return AnthropicAdapter(provider, options, sink)
    return OpenAIAdapter(provider, options, sink)


# What httpx.AsyncClient would send by default, minus cookies: the adapters add content-type and
# the provider's own headers. Only encodings httpx always decodes are offered.
_DEFAULT_HEADERS = {
    "accept": "*/*",
    "accept-encoding": "gzip, deflate",
    "connection": "keep-alive",
    "user-agent": f"ballast-router python-httpx/{httpx.__version__}",
}


# Prepared request heads one provider client keeps (one per endpoint URL; a catalog's models of
# one provider rarely need more than a few). Past this they are all written again.
_MAX_PREPARED = 1024


class ProviderClient:
    """One provider's pooled HTTP client: httpx requests sent straight to the pooled transport
    (network.Http11Transport, an httpx transport).

    httpx.AsyncClient around the same transport adds what provider calls never use: merging
    relative URLs into a base URL, a cookie jar (provider APIs authenticate by header; the
    cookies they set, such as Cloudflare's `__cf_bm`, mean nothing to an API client), auth
    flows, redirect following and event hooks. Together that was a fifth of a small call's
    client CPU, which the router paid on every provider call (bench/router_overhead.py).
    Requests, responses, timeouts and exceptions are httpx's own, as before.
    """

    def __init__(
        self, transport: httpx.AsyncBaseTransport, headers: Mapping[str, str], timeout: httpx.Timeout
    ) -> None:
        self._transport = transport
        self._headers = httpx.Headers({**_DEFAULT_HEADERS, **headers})
        self._timeout = timeout.as_dict()
        # Over our own transport, each URL's request head is written once (prepare_post), not
        # built as an httpx.Request and checked again on every call: a tenth of a small call's
        # client CPU. Adapters pass each endpoint's URL object, so this stays small.
        self._ours = transport if isinstance(transport, Http11Transport) else None
        self._prepared: dict[httpx.URL, PreparedPost] = {}

    async def _send(self, url: httpx.URL, content: bytes) -> httpx.Response:
        """POSTs `content`; the response comes back as soon as its head has arrived."""
        ours = self._ours
        if ours is not None:
            prepared = self._prepared.get(url)
            if prepared is None:
                if len(self._prepared) >= _MAX_PREPARED:
                    self._prepared.clear()
                prepared = self._prepared[url] = ours.prepare_post(url, self._headers)
            return await ours.post_prepared(prepared, content, self._timeout)
        request = httpx.Request(
            "POST", url, headers=self._headers, content=content, extensions={"timeout": self._timeout}
        )
        response = await self._transport.handle_async_request(request)
        response.request = request
        return response

    async def post(self, url: httpx.URL, content: bytes) -> httpx.Response:
        """The whole response, its body read (and decoded), its connection back in the pool."""
        response = await self._send(url, content)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    async def post_for_body(self, url: httpx.URL, content: bytes) -> tuple[httpx.Response, bytes]:
        """The response (its head) and its whole body, decoded; its connection back in the pool.
        What `post` does, reading the body as body_chunks does: what the adapters call."""
        response = await self._send(url, content)
        try:
            body = b"".join([chunk async for chunk in body_chunks(response)])
        finally:
            await response.aclose()
        return response, body

    @contextlib.asynccontextmanager
    async def stream(self, url: httpx.URL, content: bytes) -> AsyncIterator[httpx.Response]:
        """The response with its body unread; leaving the block closes it (or frees its connection)."""
        response = await self._send(url, content)
        try:
            yield response
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()


def make_client(provider: Provider, options: ClientOptions, headers: Mapping[str, str]) -> ProviderClient:
    """One pooled client per provider (HTTP/1.1 keep-alive, see network.py).

    Adapters pass absolute URLs (`endpoint_url`), parsed once per endpoint."""
    limits = httpx.Limits(
        max_connections=options.max_connections,
        max_keepalive_connections=options.max_connections,
        keepalive_expiry=30.0,
    )
    return ProviderClient(
        Http11Transport(limits=limits, max_head_bytes=options.max_response_head_bytes),
        {**headers, **provider.headers},
        httpx.Timeout(options.read_timeout, connect=options.connect_timeout),
    )


def endpoint_url(provider: Provider, path: str) -> httpx.URL:
    """The provider's base URL joined with `path` (which starts with '/'), parsed once."""
    return httpx.URL(provider.base_url.rstrip("/") + path)


# --- errors ------------------------------------------------------------------------------------


def transport_error(exc: BaseException) -> ProviderError:
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return ProviderError(Outcome.TIMEOUT, f"timed out ({type(exc).__name__})")
    if isinstance(exc, httpx.RemoteProtocolError):
        return ProviderError(Outcome.CONNECTION_ERROR, f"connection broken: {exc}")
    if isinstance(exc, httpx.DecodingError):
        return ProviderError(Outcome.PROTOCOL_ERROR, f"undecodable answer: {exc}")
    return ProviderError(Outcome.CONNECTION_ERROR, f"{type(exc).__name__}: {exc}")


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except ValueError as exc:
        raise ProviderError(Outcome.PROTOCOL_ERROR, "the answer is not valid JSON") from exc
    if not isinstance(data, dict):
        raise ProviderError(Outcome.PROTOCOL_ERROR, "the answer is not a JSON object")
    return data


# --- rate-limit headers -------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_reset(value: str | None, now: float | None = None) -> float | None:
    """Seconds until reset from `6m0s`, `20ms`, `1.5`, or an RFC 3339 time (Anthropic)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = _DURATION_PART.findall(value)
    if parts and "".join(n + u for n, u in parts) == value:
        return sum(float(n) * _UNITS[u] for n, u in parts)
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, at.timestamp() - (time.time() if now is None else now))


def parse_retry_after(headers: httpx.Headers | Mapping[str, str], now: float | None = None) -> float | None:
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        at = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, at.timestamp() - (time.time() if now is None else now))


def _int(headers: Mapping[str, str], name: str) -> int:
    value = headers.get(name)
    if value is None:
        return -1
    try:
        return int(float(value))
    except ValueError:
        return -1


# (remaining, reset) header pairs per limit, for both providers' families of headers.
_LIMIT_PAIRS = (
    ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
    ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
    *(
        (f"anthropic-ratelimit-{kind}-remaining", f"anthropic-ratelimit-{kind}-reset")
        for kind in ("requests", "tokens", "input-tokens", "output-tokens")
    ),
)


def _reset_wait(found: Mapping[str, str], now: float) -> float | None:
    """Seconds until the exhausted limits reset (the latest of them); when none says it is
    exhausted (a request larger than what is left), until every reported limit has reset."""
    exhausted: list[float] = []
    reported: list[float] = []
    for remaining_name, reset_name in _LIMIT_PAIRS:
        reset = parse_reset(found.get(reset_name), now)
        if reset is None:
            continue
        reported.append(reset)
        if _int(found, remaining_name) == 0:
            exhausted.append(reset)
    waits = exhausted or reported
    return max(waits) if waits else None


def parse_headroom(headers: httpx.Headers, status: int) -> Headroom | None:
    """OpenAI `x-ratelimit-*` and Anthropic `anthropic-ratelimit-*` headers, plus retry-after."""
    # One pass into a plain dict: httpx.Headers scans every header on each lookup.
    found = {
        k: v
        for k, v in headers.items()
        if k.startswith(("x-ratelimit-", "anthropic-ratelimit-", "retry-after"))
    }
    if not found and status != 429:
        return None
    now = time.time()
    retry_after = parse_retry_after(found, now)
    if retry_after is None and status == 429:
        # No retry-after: the limit that ran out says when it resets.
        retry_after = _reset_wait(found, now)
    if (
        "x-ratelimit-limit-requests" in found
        or "x-ratelimit-remaining-requests" in found
        or ("x-ratelimit-remaining-tokens" in found)
    ):
        return Headroom(
            remaining_requests=_int(found, "x-ratelimit-remaining-requests"),
            remaining_tokens=_int(found, "x-ratelimit-remaining-tokens"),
            limit_requests=_int(found, "x-ratelimit-limit-requests"),
            limit_tokens=_int(found, "x-ratelimit-limit-tokens"),
            reset_requests=parse_reset(found.get("x-ratelimit-reset-requests"), now),
            reset_tokens=parse_reset(found.get("x-ratelimit-reset-tokens"), now),
            observed_at=now,
            retry_after=retry_after,
            rate_limited=status == 429,
        )
    if any(name.startswith("anthropic-ratelimit-") for name in found):
        # The combined tokens limit when present, else the input-token limit (the scarcer one).
        tokens = "tokens" if "anthropic-ratelimit-tokens-remaining" in found else "input-tokens"
        return Headroom(
            remaining_requests=_int(found, "anthropic-ratelimit-requests-remaining"),
            remaining_tokens=_int(found, f"anthropic-ratelimit-{tokens}-remaining"),
            limit_requests=_int(found, "anthropic-ratelimit-requests-limit"),
            limit_tokens=_int(found, f"anthropic-ratelimit-{tokens}-limit"),
            reset_requests=parse_reset(found.get("anthropic-ratelimit-requests-reset"), now),
            reset_tokens=parse_reset(found.get(f"anthropic-ratelimit-{tokens}-reset"), now),
            observed_at=now,
            retry_after=retry_after,
            rate_limited=status == 429,
        )
    if retry_after is not None or status == 429:
        return Headroom(observed_at=now, retry_after=retry_after, rate_limited=status == 429)
    return None


# --- server-sent events -------------------------------------------------------------------------


@dataclass(frozen=True)
class SseEvent:
    event: str
    data: str


def body_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """The response body as it arrives: straight from the transport's stream when nothing needs
    decoding (no content-encoding), else through httpx's decoders."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    stream = response.stream
    if encoding == "identity" and isinstance(stream, httpx.AsyncByteStream):
        return stream.__aiter__()
    return response.aiter_bytes()


class SseReader:
    """`text/event-stream` events from a byte stream, per the WHATWG rules: lines end in CRLF,
    LF or CR (a CRLF may be split across reads), `data` lines of one event are joined with LF,
    comments (`:`) are skipped, an event ends at a blank line; the last one may end without it
    (the SDKs accept that; one cut off mid-way fails to parse, or lacks the terminal event, and
    the adapter notices).

    One flat iterator over the body's bytes: a line never splits a UTF-8 character, so lines are
    decoded one at a time, and a stream left at its terminal event leaves no generators behind."""

    __slots__ = ("_chunks", "_data", "_ended", "_event", "_lines", "_tail")

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._lines: list[bytes] = []
        self._tail = b""
        self._event = ""
        self._data: list[str] = []
        self._ended = False

    def __aiter__(self) -> SseReader:
        return self

    def _split(self, chunk: bytes) -> None:
        text = self._tail + chunk if self._tail else chunk
        if b"\r" in text:
            # A CR at the end may be the first half of a CRLF: it waits for the next read.
            held = text.endswith(b"\r")
            if held:
                text = text[:-1]
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            lines = text.split(b"\n")
            self._tail = lines.pop() + (b"\r" if held else b"")
        else:
            lines = text.split(b"\n")
            self._tail = lines.pop()
        lines.reverse()  # popped from the end, in order
        self._lines = lines

    def _take(self, line: bytes) -> SseEvent | None:
        """Applies one line; the event it completes, if any."""
        if not line:
            event = None
            if self._data:
                event = SseEvent(self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return event
        if line[0] == 0x3A:  # ':' starts a comment
            return None
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        return None

    def ready(self) -> SseEvent | None:
        """The next event if it has already arrived whole, else None (never waits)."""
        lines = self._lines
        while lines:
            event = self._take(lines.pop())
            if event is not None:
                return event
        return None

    async def __anext__(self) -> SseEvent:
        lines = self._lines
        while True:
            while lines:
                event = self._take(lines.pop())
                if event is not None:
                    return event
            if self._ended:
                raise StopAsyncIteration
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self._ended = True
                tail, self._tail = self._tail.rstrip(b"\r"), b""
                # The last line, then the end of the stream ends the last event.
                self._lines = lines = [b"", tail] if tail else [b""]
                continue
            self._split(chunk)
            lines = self._lines


def sse_events(response: httpx.Response) -> SseReader:
    """The response's server-sent events (see SseReader)."""
    return SseReader(body_chunks(response))


def merge_deltas(deltas: list[Delta], more: list[Delta]) -> None:
    """Appends `more` to `deltas`, text joined onto a text-only delta before it: events that
    arrived together leave as one message instead of one per token. Tool-call deltas stay as
    they came."""
    for delta in more:
        if deltas and not delta.tool_calls and not deltas[-1].tool_calls:
            deltas[-1] = Delta(deltas[-1].text + delta.text)
        else:
            deltas.append(delta)
