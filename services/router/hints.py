"""Shares breaker and back-off hints between router replicas through a HintStore (Redis).

Never in a request's path: health changes are queued by `notify` (no I/O) and a background task
publishes them and reads the others' every `interval`. When the store cannot be reached the task
logs at debug level and backs off; routing simply goes on with this replica's own view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from services.kit.backoff import Backoff
from services.kit.tasks import cancel_and_wait
from services.router.health import HealthBook, Target
from services.router.store import COOLDOWN, OPEN, Hint, HintStore

log = logging.getLogger("ballast.router.hints")
MAX_BACKOFF = 30.0


class HintSharer:
    def __init__(
        self,
        store: HintStore,
        health: HealthBook,
        known: set[Target],
        interval: float,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.health = health
        self.known = known
        self.interval = interval
        self.clock = clock
        self._pending: dict[tuple[str, Target], float | None] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failures = 0

    def notify(self, event: str, target: Target, seconds: float | None) -> None:
        if event == "close":
            self._pending[(OPEN, target)] = None
        else:
            self._pending[(OPEN if event == "open" else COOLDOWN, target)] = seconds
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="router-hint-sharer")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self.store.close()

    async def sync(self) -> None:
        """Publishes what changed here, then reads every replica's hints."""
        pending, self._pending = self._pending, {}
        try:
            for (kind, (provider, model)), seconds in pending.items():
                if seconds is None:
                    await self.store.clear(kind, provider, model)
                else:
                    await self.store.publish(Hint(kind, provider, model, seconds))
        except BaseException:
            for key, value in pending.items():
                self._pending.setdefault(key, value)
            raise
        read_at = self.clock()
        hints = await self.store.active()
        open_for = {(h.provider, h.model): h.remaining for h in hints if h.kind == OPEN}
        cooldowns = {(h.provider, h.model): h.remaining for h in hints if h.kind == COOLDOWN}
        self.health.apply_shared(
            {t: s for t, s in open_for.items() if t in self.known},
            {t: s for t, s in cooldowns.items() if t in self.known},
            read_at,
        )

    async def _loop(self) -> None:
        wait = self.interval
        # After a failure the next sync waits twice the interval, then doubles, up to MAX_BACKOFF.
        backoff = Backoff(2 * self.interval, max(MAX_BACKOFF, 2 * self.interval))
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.sync()
            except (
                Exception
            ) as exc:  # any failure (Redis down, a bad record): retry later, never stop sharing
                self.failures += 1
                wait = backoff.failed()
                log.debug(
                    "sharing health hints failed", extra={"error": type(exc).__name__, "retry_in_s": wait}
                )
            else:
                backoff.succeeded()
                wait = self.interval
