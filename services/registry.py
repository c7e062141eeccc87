"""Finds each service's settings and composition root by name, in start-up order."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from services.kit.config import SERVICE_NAMES, Env
from services.kit.server import ServiceApp
from services.kit.telemetry import Telemetry

# Dependencies first: sessions calls the router (compaction); the edge calls everyone.
START_ORDER: tuple[str, ...] = ("router", "limiter", "cache", "sessions", "edge")
assert set(START_ORDER) == set(SERVICE_NAMES)

# Roles that run part of a service on their own (`ballast serve <role>`), started after the
# services: role -> (package, settings class, app builder). `ballast up` runs none of them.
ROLES: dict[str, tuple[str, str, str]] = {
    # The burst queue's workers apart from the edge, scaled on the queue's lag.
    "worker": ("services.edge", "WorkerSettings", "build_worker"),
}


def ordered(names: Sequence[str]) -> list[str]:
    known = (*START_ORDER, *ROLES)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown service(s): {', '.join(unknown)}; known: {', '.join(known)}")
    return [name for name in known if name in names]


def load_settings(name: str, env: Env) -> Any:
    """The typed settings of service `name`; problems are collected in `env`."""
    package, settings_name, _ = ROLES.get(name, (f"services.{name}", f"{name.capitalize()}Settings", ""))
    module = importlib.import_module(f"{package}.config")
    settings_cls = getattr(module, settings_name)
    return settings_cls.from_env(env)


def build_app(name: str, settings: Any, telemetry: Telemetry) -> ServiceApp:
    package, _, builder = ROLES.get(name, (f"services.{name}", "", "build"))
    module = importlib.import_module(f"{package}.app")
    app: ServiceApp = getattr(module, builder)(settings, telemetry)
    return app


def load_all_settings(names: Sequence[str], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Settings for each service, raising one ConfigError that lists every bad variable."""
    env = Env(environ)
    settings = {name: load_settings(name, env) for name in ordered(names)}
    env.check()
    return settings
