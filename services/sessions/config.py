"""Settings of the sessions service, from BALLAST_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from services.kit.config import Env, ServerSettings


@dataclass(frozen=True)
class SessionsSettings:
    server: ServerSettings
    # Conversations: memory:// (one process) or postgresql://user@host:5432/db.
    store_url: str = "memory://"

    @classmethod
    def from_env(cls, env: Env) -> SessionsSettings:
        return cls(
            server=ServerSettings.from_env("sessions", env),
            store_url=env.url("BALLAST_SESSIONS_STORE", "memory://", ["memory", "postgresql", "postgres"]),
        )
