"""Composition root of the limiter service: builds its parts and registers the servicers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import grpc
from ballast.limiter.v1 import limiter_pb2, limiter_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2_grpc

from services.kit.entry import Entry
from services.kit.server import BackendProbe, ServiceApp
from services.kit.tasks import cancel_and_wait
from services.kit.telemetry import Telemetry, store_address, store_system, trace_store
from services.limiter import metrics
from services.limiter.config import LimiterSettings, tiers_path
from services.limiter.envoy import EnvoyLimiter
from services.limiter.envoy_config import EnvoyConfig, load_envoy_config
from services.limiter.envoy_servicer import SERVICE_NAME as ENVOY_SERVICE_NAME
from services.limiter.envoy_servicer import EnvoyRateLimitServicer
from services.limiter.limiter import Limiter
from services.limiter.reload import Reloading
from services.limiter.servicer import LimiterServicer
from services.limiter.store import open_store
from services.limiter.store.base import Store
from services.limiter.tiers import TiersConfig, load_tiers

log = logging.getLogger("ballast.limiter")


class LimiterApp(ServiceApp):
    name = "limiter"

    def __init__(
        self, settings: LimiterSettings, telemetry: Telemetry, *, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(settings.server, telemetry)
        self.settings = settings
        self.clock = clock
        # Fails start-up (naming the file and each problem) when the tiers file is bad.
        self.tiers: Reloading[TiersConfig] = Reloading(tiers_path(settings.tiers_file), load_tiers)
        self.store: Store = open_store(settings, clock=clock)
        trace_store(
            self.store, telemetry, store_system(settings.store_url), store_address(settings.store_url)
        )
        self.limiter = Limiter(
            self.store,
            self.tiers,
            clock=clock,
            window_buckets=settings.window_buckets,
            idempotency_ttl=settings.idempotency_ttl,
            max_tenants=settings.server.metrics_max_tenants,
        )
        # Envoy's RateLimitService: limits from envoyproxy/ratelimit files; without a file every
        # descriptor is unconfigured and answered OK, as Envoy expects.
        self.envoy_config: Reloading[EnvoyConfig] | None = None
        if settings.envoy_config:
            self.envoy_config = Reloading(settings.envoy_config, load_envoy_config)
        self.envoy = EnvoyLimiter(self.store, self._current_envoy_config, clock=clock)
        metrics.register(telemetry.meter, self.limiter, self.envoy)
        self._headroom_task: asyncio.Task[None] | None = None

    def _current_envoy_config(self) -> EnvoyConfig | None:
        return None if self.envoy_config is None else self.envoy_config.current

    def service_names(self) -> Sequence[str]:
        return [limiter_pb2.DESCRIPTOR.services_by_name["LimiterService"].full_name, ENVOY_SERVICE_NAME]

    def register(self, server: grpc.aio.Server) -> None:
        limiter_pb2_grpc.add_LimiterServiceServicer_to_server(
            LimiterServicer(self.limiter, self.settings), server
        )
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(
            EnvoyRateLimitServicer(self.envoy, self.settings), server
        )

    def backend_probes(self) -> Mapping[str, BackendProbe]:
        # Redis is required only when the limiter cannot decide without it: fail mode `closed`
        # denies every request while Redis is down, so such a replica leaves the rotation (a
        # replica that still reaches Redis answers instead). In `local` and `open` modes a replica
        # keeps deciding without Redis by design; taking it out of rotation would turn that
        # into UNAVAILABLE for every caller once all replicas lose Redis together.
        if self.settings.store_url.startswith("memory:") or self.settings.fail_mode != "closed":
            return {}
        return {"redis": self.store.ping}

    async def start(self) -> None:
        self.tiers.start(self.settings.reload_interval)
        if self.envoy_config is not None:
            self.envoy_config.start(self.settings.reload_interval)
        if not self.settings.store_url.startswith("memory:"):
            self._headroom_task = asyncio.create_task(self._refresh_headroom(), name="limiter headroom")

    async def _refresh_headroom(self) -> None:
        while True:
            try:
                await self.limiter.refresh_headroom()
            except Exception as exc:  # a broken refresh must not stop the next one
                log.warning("headroom refresh failed", extra={"error": repr(exc)})
            await asyncio.sleep(self.settings.headroom_refresh)

    async def close(self) -> None:
        await self.tiers.stop()
        if self.envoy_config is not None:
            await self.envoy_config.stop()
        await cancel_and_wait(self._headroom_task)
        await self.store.close()


def build(settings: LimiterSettings, telemetry: Telemetry) -> LimiterApp:
    return LimiterApp(settings, telemetry)


# How `python -m services.limiter` and the all-in-one runner start this service.
ENTRY = Entry("limiter", LimiterSettings.from_env, build)
