"""High priority first when a replica is short of CPU: lower-priority work gives way.

A Python service runs every request on one event loop, so when the process is saturated each
callback waits behind all the others and every request slows down together, an enterprise chat
as much as a free-tier job. The sign is that the loop runs its timers late (loop lag). The
governor measures that lag every interval and sets how much lower-priority work may run at once,
in lanes ordered from least to most important:

  queue        the burst queue's workers (free-tier jobs, by default)
  free         synchronous chats of low priority (free tier, by default); one that would wait
               longer than BALLAST_EDGE_FREE_CHAT_MAX_WAIT is refused with a retry hint
  interactive  synchronous chats of normal priority (paid, by default)

High and critical priority chats (enterprise) never wait for a slot. While the loop is late by
more than the target, the least important lane not yet at its floor is halved; while it keeps
time, the most important lane below its ceiling grows by an eighth (at least one). So the queue
gives way first and is restored last, free chats next, and paid chats wait only when pausing
the queue and the free tier was not enough. Every lane keeps a floor, so nothing stops entirely.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from services.kit.tasks import cancel_and_wait


class Lane:
    """Concurrent work of one kind, with an allowance the governor moves between floor and ceiling."""

    def __init__(self, name: str, ceiling: int, floor: int) -> None:
        self.name = name
        self.ceiling = max(1, ceiling)
        self.floor = max(1, min(floor, self.ceiling))
        self.allowed = self.ceiling
        self.active = 0
        self.waiting = 0
        self._changed = asyncio.Condition()

    async def acquire(self) -> None:
        """Waits while the lane is at its allowance, then takes a slot."""
        async with self._changed:
            self.waiting += 1
            try:
                await self._changed.wait_for(lambda: self.active < self.allowed)
            finally:
                self.waiting -= 1
            self.active += 1

    async def release(self) -> None:
        async with self._changed:
            self.active -= 1
            self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Held while one piece of work runs."""
        await self.acquire()
        try:
            yield
        finally:
            await self.release()

    async def set_allowed(self, allowed: int) -> None:
        allowed = max(self.floor, min(self.ceiling, allowed))
        if allowed != self.allowed:
            async with self._changed:
                self.allowed = allowed
                self._changed.notify_all()


class LoadGovernor:
    def __init__(self, *, target_lag: float, interval: float) -> None:
        # Loop lag (seconds) above which lower-priority work backs off; 0 turns governing off.
        self.target_lag = target_lag
        self.interval = interval
        self.lanes: list[Lane] = []  # least important first
        self.lag = 0.0  # the last measured lag, seconds
        self._task: asyncio.Task[None] | None = None

    def lane(self, name: str, ceiling: int, floor: int) -> Lane:
        """Adds a lane more important than those added before it."""
        lane = Lane(name, ceiling, floor)
        self.lanes.append(lane)
        return lane

    @property
    def enabled(self) -> bool:
        return self.target_lag > 0 and any(lane.floor < lane.ceiling for lane in self.lanes)

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._measure(), name="edge-load-governor")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def observe(self, lag: float) -> None:
        """Moves one lane's allowance in answer to one lag measurement."""
        self.lag = lag
        if lag > self.target_lag:
            for lane in self.lanes:  # the least important that can still give way
                if lane.allowed > lane.floor:
                    await lane.set_allowed(lane.allowed // 2)
                    return
        else:
            for lane in reversed(self.lanes):  # the most important first
                if lane.allowed < lane.ceiling:
                    await lane.set_allowed(lane.allowed + max(1, lane.allowed // 8))
                    return

    async def _measure(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self.interval)
            await self.observe(max(0.0, loop.time() - started - self.interval))
