"""The router's hint store: the contract (base.py) and the implementation a URL picks."""

from __future__ import annotations

from services.router.store.base import COOLDOWN, OPEN, Hint, HintStore

__all__ = ["COOLDOWN", "OPEN", "Hint", "HintStore", "open_hint_store"]


def open_hint_store(url: str) -> HintStore:
    if url.startswith(("redis://", "rediss://", "unix://")):
        from services.router.store.redis import RedisHintStore

        return RedisHintStore(url)
    from services.router.store.memory import MemoryHintStore

    return MemoryHintStore()
