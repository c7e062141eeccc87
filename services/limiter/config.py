"""Settings of the limiter service, from BALLAST_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from services.kit.config import Env, ServerSettings


@dataclass(frozen=True)
class LimiterSettings:
    server: ServerSettings
    # Counters and buckets: memory:// (one process) or redis://host:6379/0 (shared by replicas).
    store_url: str = "memory://"

    @classmethod
    def from_env(cls, env: Env) -> LimiterSettings:
        return cls(
            server=ServerSettings.from_env("limiter", env),
            store_url=env.url("BALLAST_LIMITER_STORE", "memory://", ["memory", "redis", "rediss"]),
        )
