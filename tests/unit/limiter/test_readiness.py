"""Which backends the limiter's readiness requires: Redis only when its fail mode cannot decide
without it (`closed`); in `local` and `open` modes a replica keeps answering through an outage,
so it stays in rotation (deploy/kubernetes/README.md, "Readiness and liveness")."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from services.kit.config import Env
from services.kit.telemetry import setup_telemetry
from services.limiter.app import LimiterApp
from services.limiter.config import LimiterSettings
from services.limiter.store.base import StoreUnavailableError
from tests.support.backends import free_port

MakeApp = Callable[[str, str], LimiterApp]


@pytest.fixture
async def make_app() -> AsyncIterator[MakeApp]:
    apps: list[LimiterApp] = []

    def make(store: str, mode: str) -> LimiterApp:
        environ = {
            "BALLAST_LIMITER_STORE": store,
            "BALLAST_LIMITER_FAIL_MODE": mode,
            "OTEL_SDK_DISABLED": "true",
        }
        env = Env(environ)
        settings = LimiterSettings.from_env(env)
        env.check()
        app = LimiterApp(settings, setup_telemetry("limiter", environ=environ))
        apps.append(app)
        return app

    yield make
    for app in apps:
        await app.store.close()


@pytest.mark.parametrize("mode", ["local", "open"])
async def test_a_fail_mode_that_decides_without_redis_does_not_require_it(
    make_app: MakeApp, redis_url: str, mode: str
) -> None:
    assert dict(make_app(redis_url, mode).backend_probes()) == {}


async def test_fail_closed_requires_redis_and_its_check_reaches_it(make_app: MakeApp, redis_url: str) -> None:
    probes = make_app(redis_url, "closed").backend_probes()
    assert set(probes) == {"redis"}
    await probes["redis"]()  # the shared Redis answers


async def test_fail_closed_check_fails_when_redis_is_unreachable(make_app: MakeApp) -> None:
    probes = make_app(f"redis://127.0.0.1:{free_port()}/0", "closed").backend_probes()
    with pytest.raises(StoreUnavailableError):
        await probes["redis"]()


async def test_memory_needs_nothing(make_app: MakeApp) -> None:
    assert dict(make_app("memory://", "closed").backend_probes()) == {}
