"""What entry.run sets up before a service starts: the event loop (BALLAST_EVENT_LOOP) and
numpy's BLAS threads (BALLAST_BLAS_THREADS)."""

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
# running loop, prints which loop that is and how many threads numpy's BLAS runs.
_SERVICE = """
import asyncio
import numpy
from threadpoolctl import threadpool_info
from dataclasses import dataclass
from services.kit.config import ServerSettings
from services.kit.entry import Entry, run
from tests.unit.kit import probe_app

@dataclass(frozen=True)
class Settings:
    server: ServerSettings

def build(settings, telemetry):
    blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    print(type(asyncio.get_running_loop()).__module__, *blas, flush=True)
    return probe_app.ProbeApp(settings.server, telemetry)

raise SystemExit(run([Entry("probe", lambda env: Settings(ServerSettings.from_env("limiter", env)), build)]))
"""


def _start_a_service(environ: dict[str, str]) -> list[str]:
    """The loop's module and numpy's BLAS threads, as the service printed them."""
    ours = ("BALLAST_EVENT_LOOP", "BALLAST_BLAS_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
    inherited = {k: v for k, v in os.environ.items() if k not in ours}
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
        return process.stdout.readline().split()
    finally:
        process.terminate()
        process.wait(60)


def test_a_service_runs_on_uvloop_with_one_blas_thread_by_default() -> None:
    assert _start_a_service({}) == ["uvloop", "1"]


def test_an_operator_can_choose_the_standard_loop_and_blas_threads() -> None:
    loop, blas = _start_a_service({"BALLAST_EVENT_LOOP": "asyncio", "BALLAST_BLAS_THREADS": "0"})
    assert loop.startswith("asyncio.")
    assert int(blas) == os.cpu_count()


@pytest.mark.parametrize(("event_loop", "module"), [("uvloop", "uvloop"), ("asyncio", "asyncio.unix_events")])
def test_run_on_loop_returns_what_the_coroutine_returns(event_loop: str, module: str) -> None:
    async def main() -> str:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__

    assert run_on_loop(main(), event_loop) == module
