"""Settings of the router service, from BALLAST_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from services.kit.config import Env, ServerSettings


@dataclass(frozen=True)
class RouterSettings:
    server: ServerSettings

    @classmethod
    def from_env(cls, env: Env) -> RouterSettings:
        return cls(server=ServerSettings.from_env("router", env))
