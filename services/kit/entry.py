"""How a service starts: settings → logging and telemetry → app → serve until SIGTERM.

Each service names its own `Entry` in its `app.py`; its `__main__` runs that one entry, and
the all-in-one runner runs several in one process. The kit knows no service by name.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from services.kit.collector import freeze_startup_heap, set_young_threshold
from services.kit.config import ConfigError, Env, ServerSettings
from services.kit.logging import setup_logging
from services.kit.native import limit_blas_threads, limit_malloc_arenas
from services.kit.server import ServiceApp, run_until_signal
from services.kit.telemetry import Telemetry, setup_telemetry


class HasServer(Protocol):
    """Every service's settings carry the common server settings."""

    @property
    def server(self) -> ServerSettings: ...


S = TypeVar("S", bound=HasServer)
T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[S]):
    """One service's start-up recipe: how to read its settings and how to build its app."""

    name: str
    settings_from_env: Callable[[Env], S]
    build: Callable[[S, Telemetry], ServiceApp]

    def load(self, env: Env) -> S:
        return self.settings_from_env(env)


def load_settings(entries: Sequence[Entry[Any]], environ: Mapping[str, str] | None = None) -> list[Any]:
    """Settings for each entry, raising one ConfigError that lists every bad variable."""
    env = Env(environ)
    settings = [entry.load(env) for entry in entries]
    env.check()
    return settings


def run(entries: Sequence[Entry[Any]], *, banner: Callable[[list[Any]], None] | None = None) -> int:
    """Runs `entries` (in the order given) in one process until SIGTERM; the exit status."""
    try:
        settings = load_settings(entries)
    except ConfigError as exc:
        print(f"ballast: {exc}", file=sys.stderr)
        return 2
    first: ServerSettings = settings[0].server
    # Before the services start their threads: an arena made before the limit stays.
    limit_malloc_arenas(first.malloc_arenas)
    limit_blas_threads(first.blas_threads)
    set_young_threshold(first.gc_young_threshold)
    setup_logging(first.log_level, first.log_format)
    if banner is not None:
        banner(settings)

    async def serve() -> None:
        # Apps are built inside the running loop: gRPC channels and pools bind to the loop they start on.
        apps = [
            entry.build(s, setup_telemetry(entry.name)) for entry, s in zip(entries, settings, strict=True)
        ]
        # What the services hold once started (modules, models, pools) lives as long as the process.
        await run_until_signal(apps, freeze_startup_heap if first.gc_freeze else None)

    run_on_loop(serve(), first.event_loop)
    return 0


def run_on_loop(main: Coroutine[Any, Any, T], event_loop: str) -> T:
    """Runs `main` to completion on a new loop of the kind BALLAST_EVENT_LOOP names."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if event_loop == "uvloop":
        # Imported here: a service set to asyncio never loads it.
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
