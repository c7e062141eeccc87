"""Limiter stores, chosen by URL: memory:// (one process) or redis:// (shared by replicas)."""

from __future__ import annotations

import time
from collections.abc import Callable

from services.limiter.config import LimiterSettings
from services.limiter.store.base import Store
from services.limiter.store.memory import MemoryStore
from services.limiter.store.resilient import ResilientStore


def open_store(settings: LimiterSettings, *, clock: Callable[[], float] = time.time) -> Store:
    """The configured store; a shared one is wrapped with the timeout and fail mode."""
    url = settings.store_url
    if url.startswith("memory:"):
        return MemoryStore(clock=clock, buckets=settings.window_buckets)
    from services.limiter.store.redis import RedisStore

    primary = RedisStore(
        url,
        buckets=settings.window_buckets,
        timeout=settings.store_timeout,
        pool_size=settings.redis_pool_size,
        # A clock injected into the service (tests) drives the scripts too; otherwise they read
        # Redis's TIME, the one clock every replica shares.
        clock_ms=None if clock is time.time else (lambda: clock() * 1000),
    )
    return ResilientStore(
        primary,
        mode=settings.fail_mode,
        timeout=settings.store_timeout,
        retry_interval=settings.store_retry_interval,
        replicas=settings.replicas,
        share=settings.local_share,
        memory=settings.outage_memory,
        buckets=settings.window_buckets,
        clock=clock,
    )
