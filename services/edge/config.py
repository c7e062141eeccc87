"""Settings of the edge service, from BALLAST_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from services.kit.config import Env, ServerSettings


@dataclass(frozen=True)
class EdgeSettings:
    server: ServerSettings
    # Job queue for SubmitChat: memory:// (one process) or redis://host:6379/0 (Redis Streams).
    queue_url: str = "memory://"

    @classmethod
    def from_env(cls, env: Env) -> EdgeSettings:
        return cls(
            server=ServerSettings.from_env("edge", env),
            queue_url=env.url("BALLAST_EDGE_QUEUE", "memory://", ["memory", "redis", "rediss"]),
        )
