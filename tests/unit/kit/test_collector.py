"""The garbage collector's settings (services/kit/collector.py): BALLAST_GC_YOUNG_THRESHOLD and
BALLAST_GC_FREEZE, as a service started through entry.run applies them. Each case runs in a
process of its own: the collector's state is the whole interpreter's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

# A service started the way every service starts. It prints the young generation's threshold
# and how many objects are frozen when it starts (the signal handlers are in place by then), and
# both again when it closes, after run_until_signal has run everything it runs once started.
_SERVICE = """
import gc
from dataclasses import dataclass
from services.kit.config import ServerSettings
from services.kit.entry import Entry, run
from tests.unit.kit import probe_app

@dataclass(frozen=True)
class Settings:
    server: ServerSettings

class Reporting(probe_app.ProbeApp):
    async def start(self):
        print("starting", gc.get_threshold()[0], gc.get_freeze_count(), flush=True)

    async def close(self):
        print("closed", gc.get_threshold()[0], gc.get_freeze_count(), flush=True)

def build(settings, telemetry):
    return Reporting(settings.server, telemetry)

raise SystemExit(run([Entry("probe", lambda env: Settings(ServerSettings.from_env("limiter", env)), build)]))
"""

_GC_VARIABLES = ("BALLAST_GC_YOUNG_THRESHOLD", "BALLAST_GC_FREEZE")


def _run(environ: dict[str, str]) -> subprocess.Popen[str]:
    inherited = {k: v for k, v in os.environ.items() if k not in _GC_VARIABLES}
    env = {**inherited, "BALLAST_LIMITER_PORT": "0", "BALLAST_METRICS": "false", "OTEL_SDK_DISABLED": "true"}
    return subprocess.Popen(
        [sys.executable, "-c", _SERVICE],
        cwd=ROOT,
        env={**env, **environ},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _start_and_stop(environ: dict[str, str]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(young threshold, frozen objects) as the service starts and as it closes."""
    process = _run(environ)
    try:
        assert process.stdout is not None
        starting = process.stdout.readline().split()
        assert starting[:1] == ["starting"], starting
        process.terminate()  # handled: the service shuts down gracefully and closes
        closed = process.stdout.readline().split()
        assert closed[:1] == ["closed"], closed
        assert process.wait(60) == 0
        return (int(starting[1]), int(starting[2])), (int(closed[1]), int(closed[2]))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(60)


def test_a_service_collects_its_young_generation_less_often_and_freezes_what_it_started_with() -> None:
    starting, closed = _start_and_stop({})
    assert starting == (10_000, 0)  # set before the apps are built; nothing frozen yet
    threshold, frozen = closed
    assert threshold == 10_000
    # Everything the interpreter held once started: modules, gRPC, protobuf, OpenTelemetry (a
    # bare interpreter holds about 5,000 objects that the collector tracks).
    assert frozen > 20_000


def test_an_operator_can_keep_pythons_own_collector() -> None:
    starting, closed = _start_and_stop({"BALLAST_GC_YOUNG_THRESHOLD": "0", "BALLAST_GC_FREEZE": "false"})
    assert starting == closed == (700, 0)  # CPython's default threshold, nothing frozen


def test_a_threshold_of_one_collects_nearly_at_every_allocation() -> None:
    starting, _ = _start_and_stop({"BALLAST_GC_YOUNG_THRESHOLD": "1", "BALLAST_GC_FREEZE": "false"})
    assert starting == (1, 0)


def test_bad_collector_settings_are_refused_by_name() -> None:
    process = _run({"BALLAST_GC_YOUNG_THRESHOLD": "-5", "BALLAST_GC_FREEZE": "sometimes"})
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "BALLAST_GC_YOUNG_THRESHOLD" in err
    assert "BALLAST_GC_FREEZE" in err


# Garbage made before the freeze is collected, not frozen; what lives is frozen; what is made
# after stays collectable.
_FREEZE = """
import gc, weakref
from services.kit.collector import freeze_startup_heap, set_young_threshold

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a

gc.disable()  # only the calls below collect
dropped = weakref.ref(cycle())
kept = cycle()
frozen = freeze_startup_heap()
assert dropped() is None, "garbage made before the freeze was frozen"
assert frozen == gc.get_freeze_count() > 0
assert not any(o is kept for o in gc.get_objects()), "a live object was not frozen"
later = weakref.ref(cycle())
gc.collect()
assert later() is None, "a cycle made after the freeze was not collected"
middle, old = gc.get_threshold()[1:]
assert set_young_threshold(0) is False and gc.get_threshold()[0] == 700
assert set_young_threshold(5000) is True and gc.get_threshold() == (5000, middle, old)
print("ok")
"""


def test_freezing_collects_first_and_leaves_later_objects_collectable() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _FREEZE], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == "ok", done.stderr
