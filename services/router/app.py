"""Composition root of the router: catalog, embedded sim providers, adapters, gateway, servicer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import grpc
from ballast.router.v1 import router_pb2, router_pb2_grpc

from services.kit.clients import open_channel
from services.kit.entry import Entry
from services.kit.server import ServiceApp
from services.kit.telemetry import Telemetry
from services.router.catalog import Catalog
from services.router.config import RouterSettings
from services.router.health import HealthBook
from services.router.hints import HintSharer
from services.router.metrics import RouterMetrics
from services.router.providers.base import Adapter, ClientOptions, Headroom, build_adapter
from services.router.reporter import HeadroomReporter
from services.router.router import Gateway
from services.router.routing import Planner
from services.router.servicer import RouterServicer
from services.router.sim import SimServer
from services.router.store import open_hint_store

log = logging.getLogger("ballast.router")


class RouterApp(ServiceApp):
    name = "router"

    def __init__(
        self, settings: RouterSettings, telemetry: Telemetry, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(settings.server, telemetry)
        if settings.catalog is None:
            raise ValueError("the router needs a catalog (settings come from RouterSettings.from_env)")
        self.settings = settings
        self.catalog: Catalog = settings.catalog
        self.clock = clock
        self.health = HealthBook(settings.breaker, clock)
        self.planner = Planner(self.catalog, self.health, headroom_reserve=settings.headroom_reserve)
        self.gateway = Gateway(
            settings,
            self.planner,
            self.health,
            {},
            clock=clock,
            tracer=telemetry.lean_tracer,
            metrics=RouterMetrics(telemetry.meter, self.health),
        )
        self.servicer = RouterServicer(settings, self.catalog, self.gateway, self.planner, self.health, clock)
        self.sims: dict[str, SimServer] = {}
        self.reporter: HeadroomReporter | None = None
        self.sharer: HintSharer | None = None

    def service_names(self) -> Sequence[str]:
        return [router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name]

    def register(self, server: grpc.aio.Server) -> None:
        router_pb2_grpc.add_RouterServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        catalog = self.catalog
        # Embedded SIMULATED providers: real HTTP servers on loopback, reached through the real adapters.
        for provider in catalog.providers.values():
            if not provider.simulated or provider.base_url:
                continue
            models = {
                m.provider_model: m.dimensions for m in catalog.models.values() if m.provider == provider.name
            }
            sim = SimServer(
                provider.name, provider.sim, models=models, latency_scale=self.settings.sim_latency_scale
            )
            port = await sim.start("127.0.0.1", provider.sim.port if provider.sim else 0)
            self.sims[provider.name] = sim
            catalog = catalog.with_provider(
                replace(provider, base_url=f"{sim.url}/v1" if provider.wire == "openai" else sim.url)
            )
            log.info(
                "simulated provider started",
                extra={"provider": provider.name, "port": port, "simulated": True},
            )
        self.catalog = catalog
        self.planner.catalog = catalog
        self.servicer.catalog = catalog
        timeouts = self.settings.timeouts
        options = ClientOptions(
            connect_timeout=timeouts.connect,
            read_timeout=max(timeouts.attempt, timeouts.stream_idle),
            max_connections=self.settings.max_connections,
            max_response_head_bytes=self.settings.max_response_head_bytes,
            default_max_output_tokens=self.settings.default_max_output_tokens,
            max_reset_wait=self.settings.retry.max_reset_wait,
        )
        adapters: dict[str, Adapter] = {}
        for provider in catalog.providers.values():
            if provider.enabled:
                adapters[provider.name] = build_adapter(
                    provider, options, self.gateway.observe(provider.name)
                )
        self.gateway.adapters.update(adapters)
        if not self.settings.store_url.startswith("memory://"):
            known = {(m.provider, m.id) for m in catalog.models.values()}
            self.sharer = HintSharer(
                open_hint_store(self.settings.store_url),
                self.health,
                known,
                self.settings.hints_interval,
                self.clock,
            )
            self.health.listeners.append(self.sharer.notify)
            self.sharer.start()
        if self.settings.report_headroom:
            address = self.settings.server.addresses["limiter"]
            self.reporter = HeadroomReporter(
                lambda: open_channel(address, self.settings.server, self.telemetry),
                self.settings.headroom_interval,
            )
            self.gateway.listeners.append(self.reporter.notify)
            self.health.listeners.append(self._report_open_breaker)
            self.reporter.start()

    def _report_open_breaker(self, event: str, target: tuple[str, str], seconds: float | None) -> None:
        """A target whose breaker opened has unknown headroom until it may close (a report with no
        figures but a retry-after). Without this the limiter would keep judging by what the
        provider reported before it failed (an outage answers errors, not rate-limit headers);
        reporting it as exhausted instead would throttle everyone whenever the fallbacks had not
        been called yet. Unknown lets the providers that can take traffic decide."""
        if event == "open" and self.reporter is not None:
            provider, model = target
            self.reporter.notify(provider, model, Headroom(retry_after=seconds, observed_at=time.time()))

    async def close(self) -> None:
        if self.reporter is not None:
            await self.reporter.close()
        if self.sharer is not None:
            await self.sharer.close()
        for adapter in self.gateway.adapters.values():
            await adapter.aclose()
        for sim in self.sims.values():
            await sim.close()


def build(settings: RouterSettings, telemetry: Telemetry) -> RouterApp:
    return RouterApp(settings, telemetry)


# How `python -m services.router` and the all-in-one runner start this service.
ENTRY = Entry("router", RouterSettings.from_env, build)
