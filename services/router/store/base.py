"""Health hints shared by router replicas: "this provider+model's breaker is open" and "it asked us
to back off" (429 retry-after), each for a number of seconds.

Each replica keeps its own breakers and EWMA figures; the hints only spare the other replicas
from paying for a failure one of them already saw. `memory://` keeps them in this process (one
replica, nothing to share); `redis://host:6379/0?key_prefix=p` shares them through Redis.
This module is the store's contract; `open_hint_store` (in the package) picks an implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

OPEN = "open"
COOLDOWN = "cooldown"


@dataclass(frozen=True)
class Hint:
    kind: str  # OPEN or COOLDOWN
    provider: str
    model: str
    # Seconds the hint still holds.
    remaining: float


class HintStore(Protocol):
    async def publish(self, hint: Hint) -> None:
        """Records `hint` for `hint.remaining` seconds (replacing an older one for the same target)."""
        ...

    async def clear(self, kind: str, provider: str, model: str) -> None: ...

    async def active(self) -> list[Hint]:
        """Every hint still holding, with the seconds it has left."""
        ...

    async def close(self) -> None: ...
