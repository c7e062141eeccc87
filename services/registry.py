"""The all-in-one runner's table of services, in start-up order.

The runner imports the services; no service imports the runner. Each service is imported
only when asked for, so `ballast serve limiter` does not load the cache's embedder.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from services.kit.config import SERVICE_NAMES, Env
from services.kit.entry import Entry
from services.kit.entry import load_settings as _load_settings
from services.kit.server import ServiceApp
from services.kit.telemetry import Telemetry

# Dependencies first, so each service finds the ones it calls already serving: the router reports
# headroom to the limiter; the cache (router embedder) and sessions (compaction) call the router;
# the edge calls everyone.
START_ORDER: tuple[str, ...] = ("limiter", "router", "cache", "sessions", "edge")
assert set(START_ORDER) == set(SERVICE_NAMES)

# Roles that run part of a service on their own (`ballast serve <role>`), started after the
# services: role -> the module naming its Entry and that Entry's name. `ballast up` runs none.
ROLES: dict[str, tuple[str, str]] = {
    # The burst queue's workers apart from the edge, scaled on the queue's lag.
    "worker": ("services.edge.app", "WORKER_ENTRY"),
}


def ordered(names: Sequence[str]) -> list[str]:
    known = (*START_ORDER, *ROLES)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown service(s): {', '.join(unknown)}; known: {', '.join(known)}")
    return [name for name in known if name in names]


def entry(name: str) -> Entry[Any]:
    """The start-up recipe that `services/<name>/app.py` names (a role's, its service's app.py)."""
    if name not in SERVICE_NAMES and name not in ROLES:
        raise ValueError(f"unknown service {name!r}; known: {', '.join((*START_ORDER, *ROLES))}")
    module, attribute = ROLES.get(name, (f"services.{name}.app", "ENTRY"))
    found: Entry[Any] = getattr(importlib.import_module(module), attribute)
    return found


def entries(names: Sequence[str]) -> list[Entry[Any]]:
    return [entry(name) for name in ordered(names)]


def load_settings(name: str, env: Env) -> Any:
    """The typed settings of service `name`; problems are collected in `env`."""
    return entry(name).load(env)


def build_app(name: str, settings: Any, telemetry: Telemetry) -> ServiceApp:
    return entry(name).build(settings, telemetry)


def load_all_settings(names: Sequence[str], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Settings for each service, raising one ConfigError that lists every bad variable."""
    chosen = entries(names)
    return dict(zip((e.name for e in chosen), _load_settings(chosen, environ), strict=True))
