"""The event loop a service runs on (BALLAST_EVENT_LOOP, services/kit/entry.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.kit.entry import run_on_loop

ROOT = Path(__file__).resolve().parents[3]

# A service started the way every service starts (entry.run); its app, when built inside the
# running loop, prints which loop that is.
_SERVICE = """
import asyncio
from dataclasses import dataclass
from services.kit.config import ServerSettings
from services.kit.entry import Entry, run
from tests.unit.kit import probe_app

@dataclass(frozen=True)
class Settings:
    server: ServerSettings

def build(settings, telemetry):
    print(type(asyncio.get_running_loop()).__module__, flush=True)
    return probe_app.ProbeApp(settings.server, telemetry)

raise SystemExit(run([Entry("probe", lambda env: Settings(ServerSettings.from_env("limiter", env)), build)]))
"""


def _loop_of_a_service(environ: dict[str, str]) -> str:
    inherited = {k: v for k, v in os.environ.items() if k != "BALLAST_EVENT_LOOP"}
    env = {
        **inherited,
        "BALLAST_LIMITER_PORT": "0",
        "BALLAST_METRICS": "false",
        "OTEL_SDK_DISABLED": "true",
        **environ,
    }
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVICE], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        return process.stdout.readline().strip()
    finally:
        process.terminate()
        process.wait(60)


def test_a_service_runs_on_uvloop_by_default() -> None:
    assert _loop_of_a_service({}) == "uvloop"


def test_an_operator_can_choose_the_standard_loop() -> None:
    assert _loop_of_a_service({"BALLAST_EVENT_LOOP": "asyncio"}).startswith("asyncio.")


@pytest.mark.parametrize(("event_loop", "module"), [("uvloop", "uvloop"), ("asyncio", "asyncio.unix_events")])
def test_run_on_loop_returns_what_the_coroutine_returns(event_loop: str, module: str) -> None:
    async def main() -> str:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__

    assert run_on_loop(main(), event_loop) == module
