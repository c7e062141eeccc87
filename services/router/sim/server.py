"""A SIMULATED LLM provider over real HTTP: OpenAI chat completions, Anthropic messages, embeddings.

It answers with deterministic text (seeded, derived from the prompt), calls tools, reports usage,
enforces RPM/TPM limits with the real rate-limit headers, and misbehaves on request: random 500s
and 429s, scripted outages, and faults set through `POST /admin/fault` or `set_fault()`:

    down   the connection is closed without an answer
    hang   no answer at all (until the fault ends)
    error  an HTTP error with the provider's error body (status 500 unless set)
    rate_limit  429 with retry-after
    break  streams stop after `after_tokens` tokens with the connection cut (no terminal frame);
           non-streaming answers are cut short
    stall  streams stop sending after `after_tokens` tokens, keeping the connection open

Every answer is labelled: `"simulated": true` in the body, `x-ballast-simulated: true` in the
headers, and a `[simulated …]` prefix in the text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from services.router.catalog import SimSpec
from services.router.sim.wire import (
    Answer,
    Chat,
    HttpError,
    anthropic_body,
    anthropic_frames,
    deployment,
    embed_text,
    header_seconds,
    openai_body,
    openai_duration,
    openai_frames,
    parse_anthropic,
    parse_openai,
    pick_tool,
    tool_arguments,
)

log = logging.getLogger("ballast.router.sim")

_VOCABULARY = [
    "the",
    "system",
    "keeps",
    "agents",
    "standing",
    "under",
    "load",
    "by",
    "routing",
    "each",
    "request",
    "to",
    "a",
    "healthy",
    "provider",
    "while",
    "caching",
    "answers",
    "sessions",
    "and",
    "limits",
    "so",
    "that",
    "traffic",
    "surges",
    "degrade",
    "gracefully",
    "instead",
    "of",
    "failing",
    "all",
    "at",
    "once",
    "every",
    "reply",
    "here",
    "is",
    "simulated",
    "text",
    "with",
    "no",
    "meaning",
    "beyond",
    "testing",
]
_HANG_LIMIT = 3600.0
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_OPENAI_ERRORS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "server_error",
}
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    529: "Overloaded",
}
FAULT_MODES = ("ok", "down", "hang", "error", "rate_limit", "no_credit", "break", "stall")


@dataclass
class Fault:
    """A misbehaviour applied to every request until `until` (clock time) or until cleared."""

    mode: str
    status: int = 500
    until: float | None = None
    after_tokens: int = 3
    retry_after: float = 1.0


@dataclass
class _Bucket:
    """A token bucket refilled continuously: `capacity` per minute."""

    capacity: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        rate = self.capacity / 60.0
        self.level = min(self.capacity, self.level + (now - self.updated) * rate)
        self.updated = now

    def take(self, amount: float, now: float) -> float:
        """Takes `amount` and returns 0, or returns the seconds until it could be taken."""
        self.refill(now)
        if amount <= self.level:
            self.level -= amount
            return 0.0
        return (amount - self.level) / (self.capacity / 60.0)

    def reset_after(self) -> float:
        return (self.capacity - self.level) / (self.capacity / 60.0)


@dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _AbortError(Exception):
    """Close the connection without an answer."""


@dataclass
class SimStats:
    requests: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    aborted: int = 0
    # Connections the client dropped while the sim was still answering (a cancelled stream).
    disconnects: int = 0
    # Tokens (input + output) of the chat answers delivered whole, as their usage reported them:
    # what a real provider would bill, for tests that check the suite charged exactly that.
    tokens: int = 0


class SimServer:
    """One simulated provider on one port. `models` limits the model names it knows (None: any)."""

    def __init__(
        self,
        name: str,
        spec: SimSpec | None = None,
        *,
        models: Mapping[str, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        latency_scale: float = 1.0,
        api_key: str = "",
    ) -> None:
        self.name = name
        self.spec = spec or SimSpec()
        self.models = dict(models) if models is not None else None
        self.clock = clock
        self.latency_scale = latency_scale
        self.api_key = api_key
        self.stats = SimStats()
        self.host = "127.0.0.1"
        self.port = 0
        self._rng = random.Random(self.spec.seed)
        self._fault: Fault | None = None
        self._started = clock()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen_prefixes: set[str] = set()
        self._counter = 0
        now = clock()
        self._rpm = _Bucket(self.spec.rpm, self.spec.rpm, now) if self.spec.rpm > 0 else None
        self._tpm = _Bucket(self.spec.tpm, self.spec.tpm, now) if self.spec.tpm > 0 else None

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.host = host
        self._server = await asyncio.start_server(self._accept, host, port, limit=16 * 1024 * 1024)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._started = self.clock()
        return self.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    def set_fault(self, fault: Fault | None) -> None:
        """Applies `fault` to every request from now on; None (or mode ok) heals the server."""
        self._fault = None if fault is None or fault.mode == "ok" else fault

    def current_fault(self) -> Fault | None:
        now = self.clock()
        if self._fault is not None:
            if self._fault.until is None or now < self._fault.until:
                return self._fault
            self._fault = None
        elapsed = now - self._started
        for outage in self.spec.outages:
            if outage.start_s <= elapsed < outage.start_s + outage.duration_s:
                return Fault(
                    outage.mode, outage.status, until=self._started + outage.start_s + outage.duration_s
                )
        return None

    # --- HTTP/1.1 -----------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                request = await self._read(reader)
                if request is None:
                    break
                keep = await self._dispatch(request, writer)
                if not keep:
                    break
        except _AbortError:
            self.stats.aborted += 1
            writer.transport.abort()
        except ConnectionError:
            self.stats.disconnects += 1
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            writer.transport.abort()
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(parts)
        else:
            length = int(headers.get("content-length", "0") or 0)
            body = await reader.readexactly(length) if length else b""
        return _Request(method, target.split("?", 1)[0], headers, body)

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        payload: Any,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        head = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
            "content-type: application/json",
            f"content-length: {len(body)}",
            "x-ballast-simulated: true",
        ]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1

    def _start_stream(self, writer: asyncio.StreamWriter, headers: Mapping[str, str]) -> None:
        head = [
            "HTTP/1.1 200 OK",
            "content-type: text/event-stream",
            "cache-control: no-cache",
            "transfer-encoding: chunked",
            "x-ballast-simulated: true",
        ]
        head += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        self.stats.by_status[200] = self.stats.by_status.get(200, 0) + 1

    @staticmethod
    def _chunk(writer: asyncio.StreamWriter, text: str) -> None:
        data = text.encode()
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))

    async def _dispatch(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        keep = request.headers.get("connection", "").lower() != "close"
        path = request.path
        wire = "anthropic" if path.endswith("/messages") else "openai"
        try:
            if path == "/admin/fault" and request.method == "POST":
                await self._send(writer, 200, self._admin_fault(request.body))
            elif path in ("/admin/stats", "/health") and request.method == "GET":
                await self._send(
                    writer,
                    200,
                    {
                        "provider": self.name,
                        "simulated": True,
                        "requests": self.stats.requests,
                        "by_status": self.stats.by_status,
                        "tokens": self.stats.tokens,
                    },
                )
            elif path == "/v1/models" and request.method == "GET":
                names = sorted(self.models or {})
                await self._send(
                    writer,
                    200,
                    {
                        "object": "list",
                        "simulated": True,
                        "data": [{"id": m, "object": "model", "owned_by": self.name} for m in names],
                    },
                )
            elif request.method != "POST":
                raise HttpError(405, f"{request.method} {path} is not supported")
            elif path in ("/v1/chat/completions", "/chat/completions") or (
                path.startswith("/openai/deployments/") and path.endswith("/chat/completions")
            ):
                self.stats.requests += 1
                await self._chat(request, writer, "openai")
            elif path in ("/v1/messages", "/messages"):
                self.stats.requests += 1
                await self._chat(request, writer, "anthropic")
            elif path in ("/v1/embeddings", "/embeddings") or (
                path.startswith("/openai/deployments/") and path.endswith("/embeddings")
            ):
                self.stats.requests += 1
                await self._embeddings(request, writer)
            else:
                raise HttpError(404, f"no route for {path}")
        except HttpError as exc:
            await self._send(writer, exc.status, self._error_body(wire, exc), exc.headers)
        return keep

    def _error_body(self, wire: str, exc: HttpError) -> dict[str, Any]:
        if wire == "anthropic":
            kind = _ANTHROPIC_ERRORS.get(exc.status, "api_error")
            return {"type": "error", "error": {"type": kind, "message": exc.message}, "simulated": True}
        kind = _OPENAI_ERRORS.get(
            exc.status, "server_error" if exc.status >= 500 else "invalid_request_error"
        )
        return {
            "error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.code},
            "simulated": True,
        }

    def _admin_fault(self, body: bytes) -> dict[str, Any]:
        try:
            data = json.loads(body or b"{}")
            mode = str(data.get("mode", "ok"))
            if mode not in FAULT_MODES:
                raise ValueError(mode)
            duration = data.get("duration_s")
            fault = Fault(
                mode=mode,
                status=int(data.get("status", 500)),
                until=self.clock() + float(duration) if duration else None,
                after_tokens=int(data.get("after_tokens", 3)),
                retry_after=float(data.get("retry_after_s", 1.0)),
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise HttpError(400, f"bad fault: {exc}; modes: {', '.join(FAULT_MODES)}") from exc
        self.set_fault(fault)
        return {"provider": self.name, "simulated": True, "mode": mode}

    # --- behaviour ----------------------------------------------------------------------------

    def _check_key(self, request: _Request, wire: str) -> None:
        if not self.api_key:
            return
        if wire == "anthropic":
            given = request.headers.get("x-api-key", "")
        else:
            given = request.headers.get("api-key", "") or request.headers.get(
                "authorization", ""
            ).removeprefix("Bearer ")
        if given != self.api_key:
            raise HttpError(401, "invalid API key (simulated provider)", code="invalid_api_key")

    async def _before(self, wire: str, tokens: int) -> dict[str, str]:
        """Faults, random errors and rate limits; returns the rate-limit headers to send."""
        fault = self.current_fault()
        if fault is not None:
            if fault.mode == "down":
                raise _AbortError()
            if fault.mode == "hang":
                await self._hang(fault)
                raise _AbortError()
            if fault.mode == "error":
                raise HttpError(fault.status, f"simulated outage of {self.name} (HTTP {fault.status})")
            if fault.mode == "no_credit":
                # The account is out of credit, as each provider says it (OpenAI: a 429 with
                # insufficient_quota; Anthropic: 402 billing_error).
                if wire == "anthropic":
                    raise HttpError(402, f"simulated: the {self.name} account has no credit left")
                raise HttpError(
                    429,
                    f"simulated: {self.name} says you exceeded your current quota",
                    code="insufficient_quota",
                )
            if fault.mode == "rate_limit":
                raise HttpError(
                    429,
                    f"simulated rate limit of {self.name}",
                    headers={"retry-after": header_seconds(fault.retry_after)},
                )
        roll = self._rng.random()
        if roll < self.spec.error_rate:
            raise HttpError(500, f"simulated random error of {self.name}")
        if roll < self.spec.error_rate + self.spec.rate_limit_rate:
            raise HttpError(429, f"simulated random rate limit of {self.name}", headers={"retry-after": "1"})
        now = self.clock()
        wait = 0.0
        if self._rpm is not None:
            wait = max(wait, self._rpm.take(1, now))
        if self._tpm is not None and wait == 0.0:
            wait = max(wait, self._tpm.take(tokens, now))
        headers = self._limit_headers(wire)
        if wait > 0:
            headers["retry-after"] = header_seconds(wait)
            raise HttpError(
                429,
                f"simulated provider {self.name}: rate limit reached (RPM {self.spec.rpm}, "
                f"TPM {self.spec.tpm})",
                code="rate_limit_exceeded",
                headers=headers,
            )
        return headers

    async def _hang(self, fault: Fault) -> None:
        limit = self.clock() + _HANG_LIMIT
        while self.clock() < limit:
            current = self.current_fault()
            if current is None or current.mode not in ("hang", "stall"):
                return
            await asyncio.sleep(0.02)

    def _limit_headers(self, wire: str) -> dict[str, str]:
        headers: dict[str, str] = {}
        now = self.clock()
        for kind, bucket in (("requests", self._rpm), ("tokens", self._tpm)):
            if bucket is None:
                continue
            bucket.refill(now)
            remaining = int(bucket.level)
            reset = bucket.reset_after()
            if wire == "anthropic":
                at = datetime.now(UTC) + timedelta(seconds=reset)
                headers[f"anthropic-ratelimit-{kind}-limit"] = str(int(bucket.capacity))
                headers[f"anthropic-ratelimit-{kind}-remaining"] = str(remaining)
                headers[f"anthropic-ratelimit-{kind}-reset"] = at.strftime("%Y-%m-%dT%H:%M:%SZ")
            else:
                headers[f"x-ratelimit-limit-{kind}"] = str(int(bucket.capacity))
                headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
                headers[f"x-ratelimit-reset-{kind}"] = openai_duration(reset)
        return headers

    def _latency(self) -> float:
        spec = self.spec
        median = spec.latency_median_ms / 1000.0 * self.latency_scale
        if median <= 0:
            return 0.0
        p99 = spec.latency_p99_ms / 1000.0 * self.latency_scale
        if spec.latency_distribution == "fixed":
            return median
        if spec.latency_distribution == "uniform":
            return self._rng.uniform(median / 2, max(p99, median / 2))
        sigma = math.log(max(p99, median * 1.0001) / median) / 2.326
        return median * math.exp(self._rng.gauss(0.0, sigma))

    def _token_delay(self) -> float:
        tps = self.spec.tokens_per_second
        if tps <= 0 or self.latency_scale <= 0:
            return 0.0
        return self.latency_scale / tps

    # --- chat ---------------------------------------------------------------------------------

    async def _chat(self, request: _Request, writer: asyncio.StreamWriter, wire: str) -> None:
        self._check_key(request, wire)
        try:
            data = json.loads(request.body)
            if not isinstance(data, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as exc:
            raise HttpError(400, f"We could not parse the JSON body of your request. ({exc})") from exc
        chat = parse_openai(data, request.path) if wire == "openai" else parse_anthropic(data)
        if self.models is not None and chat.model not in self.models:
            raise HttpError(
                404,
                f"The model `{chat.model}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        answer = self._answer(chat)
        headers = await self._before(wire, answer.input_tokens + max(chat.max_tokens, answer.output_tokens))
        fault = self.current_fault()
        delay = self._latency()
        if delay > 0:
            await asyncio.sleep(delay)
        if not chat.stream:
            generation = self._token_delay() * answer.output_tokens
            if generation > 0:
                await asyncio.sleep(generation)
            body = openai_body(chat, answer) if wire == "openai" else anthropic_body(chat, answer)
            if fault is not None and fault.mode == "break":
                raw = json.dumps(body).encode()
                writer.write(
                    (
                        f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        f"content-length: {len(raw)}\r\n\r\n"
                    ).encode()
                    + raw[: len(raw) // 2]
                )
                await writer.drain()
                raise _AbortError()
            if fault is not None and fault.mode == "stall":
                await self._hang(fault)
                raise _AbortError()
            await self._send(writer, 200, body, headers)
            self.stats.tokens += answer.input_tokens + answer.output_tokens
            return
        self._start_stream(writer, headers)
        frames = openai_frames(chat, answer) if wire == "openai" else anthropic_frames(chat, answer)
        step = self._token_delay()
        sent_tokens = 0
        for frame, is_token in frames:
            if is_token:
                if (
                    fault is not None
                    and fault.mode in ("break", "stall")
                    and sent_tokens >= fault.after_tokens
                ):
                    await writer.drain()
                    if fault.mode == "stall":
                        await self._hang(fault)
                    raise _AbortError()
                sent_tokens += 1
                if step > 0:
                    await writer.drain()
                    await asyncio.sleep(step)
            self._chunk(writer, frame)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        self.stats.tokens += answer.input_tokens + answer.output_tokens

    def _answer(self, chat: Chat) -> Answer:
        digest = hashlib.sha256(
            json.dumps([self.spec.seed, chat.model, chat.messages, [t[0] for t in chat.tools]]).encode()
        ).digest()
        rng = random.Random(digest)
        self._counter += 1
        response_id = f"{digest[:6].hex()}{self._counter:06d}"
        input_tokens = sum(4 + (len(text) + 3) // 4 for _, text in chat.messages)
        input_tokens += sum(8 + len(json.dumps(schema)) // 4 for _, schema in chat.tools)
        cached = 0
        if chat.messages:
            prefix = hashlib.sha256(chat.messages[0][1].encode()).hexdigest()
            first = 4 + (len(chat.messages[0][1]) + 3) // 4
            if prefix in self._seen_prefixes and first >= 32:
                cached = first
            self._seen_prefixes.add(prefix)
            if len(self._seen_prefixes) > 10_000:
                self._seen_prefixes.clear()
        last_role, last_text = chat.messages[-1] if chat.messages else ("user", "")
        tool = pick_tool(chat, last_role, last_text)
        if tool is not None:
            name, schema = tool
            call_id = ("toolu_" if chat.wire == "anthropic" else "call_") + digest[6:18].hex()
            args = json.dumps(tool_arguments(schema), separators=(",", ":"))
            label = f"[simulated {self.name}/{chat.model}] calling {name}."
            return Answer([label], [(call_id, name, args)], "tool_calls", input_tokens, cached, response_id)
        label = f"[simulated {self.name}/{chat.model}]"
        if last_role == "tool":
            label += " Based on the tool result:"
        count = self.spec.answer_pieces - 2 if self.spec.answer_pieces > 0 else 12 + rng.randrange(24)
        pieces = [label] + [" " + rng.choice(_VOCABULARY) for _ in range(count)] + ["."]
        finish = "stop"
        if chat.max_tokens and len(pieces) > chat.max_tokens:
            pieces = pieces[: chat.max_tokens]
            finish = "length"
        if chat.stop:
            text = ""
            for index, piece in enumerate(pieces):
                candidate = text + piece
                hits = [candidate.find(s) for s in chat.stop if s and s in candidate]
                if hits:
                    cut = min(hits) - len(text)
                    pieces = pieces[:index] + ([piece[:cut]] if cut > 0 else [])
                    finish = "stop"
                    break
                text = candidate
        return Answer(pieces, [], finish, input_tokens, cached, response_id)

    # --- embeddings ---------------------------------------------------------------------------

    async def _embeddings(self, request: _Request, writer: asyncio.StreamWriter) -> None:
        self._check_key(request, "openai")
        try:
            data = json.loads(request.body)
            raw = data["input"]
            inputs = [raw] if isinstance(raw, str) else [str(x) for x in raw]
            model = str(data["model"]) if "model" in data else deployment(request.path)
        except (ValueError, KeyError, TypeError) as exc:
            raise HttpError(400, f"'input' and 'model' are required ({exc})") from exc
        if not inputs or any(not text for text in inputs):
            raise HttpError(400, "'$.input' is invalid: inputs must be non-empty strings")
        if self.models is not None and model not in self.models:
            raise HttpError(404, f"The model `{model}` does not exist.", code="model_not_found")
        dims = int(data.get("dimensions") or (self.models or {}).get(model) or 256)
        tokens = sum((len(t) + 3) // 4 for t in inputs)
        headers = await self._before("openai", tokens)
        delay = self._latency() / 4
        if delay > 0:
            await asyncio.sleep(delay)
        body = {
            "object": "list",
            "model": model,
            "simulated": True,
            "data": [
                {"object": "embedding", "index": i, "embedding": embed_text(t, dims)}
                for i, t in enumerate(inputs)
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        await self._send(writer, 200, body, headers)


# --- wire formats ------------------------------------------------------------------------------
