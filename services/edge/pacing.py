"""Interactive chats first: the queue's workers give way while this process is short of CPU.

A Python service runs every request on one event loop, so when the process is saturated, each
callback waits behind all the others and every request slows down together, an enterprise
chat as much as a free-tier job from the queue. The sign is that the loop runs its timers late
(loop lag). The pacer measures that lag and sets how many queue workers may run at once: while
the loop is late by more than the target, the allowance halves each interval (never below a
floor, so the queue always moves); while it keeps time, it grows by one per interval (AIMD, as
TCP does with a congested link). Synchronous chats are never paced; queued work soaks up what
they leave.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True)
class PacingSettings:
    max_workers: int
    min_workers: int
    # Loop lag (seconds) above which queue work backs off; 0 turns pacing off.
    target_lag: float
    interval: float


class QueuePacer:
    def __init__(self, settings: PacingSettings) -> None:
        self.settings = settings
        self.allowed = settings.max_workers
        self.active = 0
        self.lag = 0.0  # the last measured lag, seconds
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.target_lag > 0 and self.settings.min_workers < self.settings.max_workers

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._measure(), name="edge-queue-pacer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Held by a worker while it claims and runs one job."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.active < self.allowed)
            self.active += 1
        try:
            yield
        finally:
            async with self._changed:
                self.active -= 1
                self._changed.notify_all()

    async def observe(self, lag: float) -> None:
        """Adjusts the allowance to one lag measurement."""
        s = self.settings
        self.lag = lag
        if lag > s.target_lag:
            allowed = max(s.min_workers, self.allowed // 2)
        else:
            allowed = min(s.max_workers, self.allowed + 1)
        if allowed != self.allowed:
            async with self._changed:
                self.allowed = allowed
                self._changed.notify_all()

    async def _measure(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.settings.interval
        while True:
            started = loop.time()
            await asyncio.sleep(interval)
            await self.observe(max(0.0, loop.time() - started - interval))
