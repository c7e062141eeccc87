"""Config files that reload without a restart: re-read when their modification time changes.

Polling (every BALLAST_LIMITER_RELOAD_INTERVAL) rather than SIGHUP: it works the same in
all-in-one mode, in containers with mounted ConfigMaps (which swap symlinks) and on
every platform. A file that fails validation is logged and the last good version stays.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from services.kit.tasks import cancel_and_wait

log = logging.getLogger("ballast.limiter.reload")

T = TypeVar("T")

Signature = tuple[tuple[str, int, int], ...]


def yaml_files(path: Path) -> list[Path]:
    """The file itself, or the *.yaml / *.yml files of a directory (sorted)."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    return [path]


def signature(path: Path) -> Signature:
    out = []
    for file in yaml_files(path):
        try:
            st = file.stat()
        except OSError:
            out.append((str(file), -1, -1))
            continue
        out.append((str(file), st.st_mtime_ns, st.st_size))
    return tuple(out)


class Reloading(Generic[T]):
    """Holds the current value loaded from `path` and reloads it when the files change."""

    def __init__(self, path: str | Path, loader: Callable[[Path], T]) -> None:
        self.path = Path(path)
        self.loader = loader
        self._signature = signature(self.path)
        # Raises on a bad file at start-up: a service must not start on broken limits.
        self._value = loader(self.path)
        self.reloads = 0
        self.errors = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def current(self) -> T:
        return self._value

    def check(self) -> bool:
        """Reloads when the files changed; True when a new value is in force."""
        sig = signature(self.path)
        if sig == self._signature:
            return False
        self._signature = sig
        try:
            value = self.loader(self.path)
        except Exception as exc:  # whatever a bad file raises, the last good config stays in force
            self.errors += 1
            log.error(
                "config not reloaded, keeping the last good one",
                extra={"path": str(self.path), "error": str(exc)},
            )
            return False
        self._value = value
        self.reloads += 1
        log.info("config reloaded", extra={"path": str(self.path)})
        return True

    def start(self, interval: float) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                self.check()

        self._task = asyncio.create_task(loop(), name=f"reload {self.path}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
