"""Where cache entries live: the Protocol every store implements, and `open_store(url)`."""

from __future__ import annotations

from services.cache.store.base import CacheStore, Entry, NamespaceCounters, StoreOptions


def open_store(url: str, options: StoreOptions) -> CacheStore:
    """memory:// (this process) or redis://… (shared by replicas; `?key_prefix=` supported)."""
    if url.startswith("memory://"):
        from services.cache.store.memory import MemoryStore

        return MemoryStore(options)
    from services.cache.store.redis import RedisStore

    return RedisStore(url, options)


__all__ = ["CacheStore", "Entry", "NamespaceCounters", "StoreOptions", "open_store"]
