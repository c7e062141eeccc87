"""Best-effort reporting of provider headroom to the limiter (LimiterService.ReportHeadroom).

`notify` never blocks and never fails: it keeps the newest state per provider+model, and a
background task sends what changed every `interval`. When the limiter cannot be reached the
task backs off (doubling up to a minute) and logs at debug; completions never wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
from ballast.limiter.v1 import limiter_pb2, limiter_pb2_grpc
from google.protobuf import duration_pb2

from services.kit.backoff import Backoff
from services.kit.protos import duration
from services.kit.tasks import cancel_and_wait
from services.router.providers.base import Headroom

log = logging.getLogger("ballast.router.reporter")
MAX_BACKOFF = 60.0
CALL_TIMEOUT = 1.0


def _duration(seconds: float | None) -> duration_pb2.Duration | None:
    return None if seconds is None else duration(seconds)  # unknown stays unset


def to_request(provider: str, model: str, headroom: Headroom) -> limiter_pb2.ReportHeadroomRequest:
    return limiter_pb2.ReportHeadroomRequest(
        provider=provider,
        model=model,
        remaining_requests=headroom.remaining_requests,
        remaining_tokens=headroom.remaining_tokens,
        limit_requests=headroom.limit_requests,
        limit_tokens=headroom.limit_tokens,
        reset_requests=_duration(headroom.reset_requests),
        reset_tokens=_duration(headroom.reset_tokens),
        rate_limited=headroom.rate_limited,
        retry_after=_duration(headroom.retry_after),
    )


class HeadroomReporter:
    def __init__(self, channel_factory: Callable[[], grpc.aio.Channel], interval: float) -> None:
        self._channel_factory = channel_factory
        self.interval = interval
        self._pending: dict[tuple[str, str], Headroom] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self.sent = 0
        self.failures = 0

    def notify(self, provider: str, model: str, headroom: Headroom) -> None:
        self._pending[(provider, model)] = headroom
        if headroom.rate_limited:
            # A 429 is news worth sending now rather than at the next tick.
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="router-headroom-reporter")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _loop(self) -> None:
        wait = self.interval
        # After a failure the next report waits twice the interval, then doubles, up to MAX_BACKOFF.
        backoff = Backoff(2 * self.interval, max(MAX_BACKOFF, 2 * self.interval))
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                continue
            batch, self._pending = self._pending, {}
            try:
                await self._send(batch)
            except Exception as exc:  # any failure (limiter down, TLS, a bug): keep the state, retry later
                self.failures += 1
                # Keep the newest state for the next try, unless something newer arrived meanwhile.
                for key, value in batch.items():
                    self._pending.setdefault(key, value)
                wait = backoff.failed()
                log.debug("headroom report failed", extra={"error": type(exc).__name__, "retry_in_s": wait})
            else:
                backoff.succeeded()
                wait = self.interval

    async def _send(self, batch: dict[tuple[str, str], Headroom]) -> None:
        if self._channel is None:
            self._channel = self._channel_factory()
        stub = limiter_pb2_grpc.LimiterServiceStub(self._channel)
        for (provider, model), headroom in batch.items():
            await stub.ReportHeadroom(to_request(provider, model, headroom), timeout=CALL_TIMEOUT)
            self.sent += 1
