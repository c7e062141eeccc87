"""Hints in this process: what a single replica (or a test) needs."""

from __future__ import annotations

import time
from collections.abc import Callable

from services.router.store.base import Hint


class MemoryHintStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._until: dict[tuple[str, str, str], float] = {}

    async def publish(self, hint: Hint) -> None:
        self._until[(hint.kind, hint.provider, hint.model)] = self.clock() + hint.remaining

    async def clear(self, kind: str, provider: str, model: str) -> None:
        self._until.pop((kind, provider, model), None)

    async def active(self) -> list[Hint]:
        now = self.clock()
        for key in [k for k, until in self._until.items() if until <= now]:
            del self._until[key]
        return [
            Hint(kind, provider, model, until - now) for (kind, provider, model), until in self._until.items()
        ]

    async def close(self) -> None:
        self._until.clear()
