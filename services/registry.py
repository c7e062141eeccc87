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


def ordered(names: Sequence[str]) -> list[str]:
    unknown = sorted(set(names) - set(SERVICE_NAMES))
    if unknown:
        raise ValueError(f"unknown service(s): {', '.join(unknown)}; known: {', '.join(START_ORDER)}")
    return [name for name in START_ORDER if name in names]


def load_settings(name: str, env: Env) -> Any:
    """The typed settings of service `name`; problems are collected in `env`."""
    module = importlib.import_module(f"services.{name}.config")
    settings_cls = getattr(module, f"{name.capitalize()}Settings")
    return settings_cls.from_env(env)


def build_app(name: str, settings: Any, telemetry: Telemetry) -> ServiceApp:
    module = importlib.import_module(f"services.{name}.app")
    app: ServiceApp = module.build(settings, telemetry)
    return app


def load_all_settings(names: Sequence[str], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Settings for each service, raising one ConfigError that lists every bad variable."""
    env = Env(environ)
    settings = {name: load_settings(name, env) for name in ordered(names)}
    env.check()
    return settings
