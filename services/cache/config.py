"""Settings of the cache service, from BALLAST_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from services.kit.config import Env, ServerSettings


@dataclass(frozen=True)
class CacheSettings:
    server: ServerSettings
    # Entries and vectors: memory:// (one process) or redis://host:6379/0 (shared by replicas).
    store_url: str = "memory://"

    @classmethod
    def from_env(cls, env: Env) -> CacheSettings:
        return cls(
            server=ServerSettings.from_env("cache", env),
            store_url=env.url("BALLAST_CACHE_STORE", "memory://", ["memory", "redis", "rediss"]),
        )
