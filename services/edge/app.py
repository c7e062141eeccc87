"""Composition roots of the edge (keys, store, downstream clients, pipeline, job workers) and of
the queue worker role, which runs the same job workers without the public API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

import grpc
from ballast.edge.v1 import edge_pb2, edge_pb2_grpc

from services.edge import auth
from services.edge.config import EdgeSettings, WorkerSettings
from services.edge.downstream import Downstream
from services.edge.edge import ChatPipeline
from services.edge.jobs import JobRunner
from services.edge.metrics import EdgeMetrics
from services.edge.openai_http import HttpFront, OpenAIHttpApp
from services.edge.pacing import LoadGovernor
from services.edge.servicer import EdgeAdminServicer, EdgeServicer, InFlightLimit, KeyRegistry
from services.edge.settlement import Settler
from services.edge.store import EdgeStore
from services.edge.tools import ToolCalls
from services.edge.webhooks import WebhookSecrets
from services.kit.entry import Entry
from services.kit.server import BackendProbe, ServiceApp
from services.kit.telemetry import Telemetry, store_address, store_system, trace_store

log = logging.getLogger("ballast.edge")


def open_store(settings: EdgeSettings) -> EdgeStore:
    if settings.store_url.startswith("memory://"):
        from services.edge.store.memory import MemoryEdgeStore

        return MemoryEdgeStore(job_ttl=settings.job_ttl)
    from services.edge.store.redis import RedisEdgeStore

    return RedisEdgeStore(
        settings.store_url,
        socket_timeout=settings.downstream_timeout,
        job_ttl=settings.job_ttl,
        pool_size=settings.store_pool_size,
    )


class _QueueApp(ServiceApp):
    """What the edge and the queue worker share: the store, the pipeline and the job workers."""

    def __init__(self, settings: EdgeSettings, telemetry: Telemetry) -> None:
        super().__init__(settings.server, telemetry)
        self.settings = settings
        # Read once: the edge takes its keys from it, both roles their tenants' webhook secrets.
        # A malformed keys file stops start-up with the file and entry named.
        self.keys_file = auth.read_keys_file(settings.keys_file)
        self.store = open_store(settings)
        trace_store(
            self.store, telemetry, store_system(settings.store_url), store_address(settings.store_url)
        )
        self.downstream = Downstream(settings, telemetry)
        # What a chat spent is settled with the limiter, retried, and recorded when it cannot be.
        self.settler = Settler(settings, self.downstream, self.store, telemetry.meter)
        self.metrics = EdgeMetrics(
            telemetry.meter,
            self.store,
            per_user=settings.server.metrics_per_user,
            sample_every=settings.queue_sample_interval,
            max_tenants=settings.server.metrics_max_tenants,
        )
        self.pipeline = ChatPipeline(settings, self.downstream, self.settler, telemetry.meter, self.metrics)
        # High priority first when short of CPU: the queue gives way, then low/normal chats.
        self.governor = LoadGovernor(target_lag=settings.pacing_target_lag, interval=settings.pacing_interval)
        queue_lane = self.governor.lane("queue", settings.workers, settings.queue_min_workers)
        self.jobs = JobRunner(
            settings,
            self.store,
            self.pipeline,
            telemetry.tracer,
            self.metrics,
            lane=queue_lane,
            role=self.name,
            # Per-tenant secrets live with the keys (the keys file's `tenants:` section).
            webhook_secrets=WebhookSecrets(settings.webhook_secret, self.keys_file.webhook_secrets),
        )

    async def start(self) -> None:
        await self.store.start()
        self.settler.start()
        self.jobs.start()
        self.governor.start()
        self.metrics.start()

    def backend_probes(self) -> Mapping[str, BackendProbe]:
        # A Redis edge store holds the API keys made by the admin RPC and the queue: neither the
        # edge (SubmitChat, GetJob, keys) nor a worker (claims) can work without it.
        return {} if self.settings.store_url.startswith("memory:") else {"redis": self.store.ping}

    async def drain(self, grace: float) -> None:
        await self.jobs.drain(grace)
        # Answers being recorded for callers that went away, and settlements under way, finish
        # (or record themselves) before the clients and the store close.
        await asyncio.gather(self.pipeline.drain(grace), self.settler.drain(grace))

    async def close(self) -> None:
        await self.metrics.stop()
        await self.governor.stop()
        await self.jobs.stop()
        # Settlements still retrying were given the grace period (drain); stop() records them.
        await self.settler.stop()
        await self.downstream.close()
        await self.store.close()


class EdgeApp(_QueueApp):
    name = "edge"

    def __init__(self, settings: EdgeSettings, telemetry: Telemetry) -> None:
        super().__init__(settings, telemetry)
        self.file_keys = list(self.keys_file.keys)
        if not self.file_keys and not settings.admin_key:
            log.warning(
                "no API keys: every call will be UNAUTHENTICATED; set BALLAST_EDGE_KEYS_FILE (the demo keys: "
                "config/edge_keys.yaml, loopback only) or BALLAST_EDGE_ADMIN_KEY to make keys"
            )
        if not settings.workers and settings.store_url.startswith("memory://"):
            log.warning(
                "BALLAST_EDGE_WORKERS=0 on a memory:// queue: no process will run queued jobs; set "
                "BALLAST_EDGE_STORE=redis://… and run `ballast serve worker`"
            )
        # Lanes from least to most important: the queue (above), free chats, paid chats.
        self.free_lane = self.governor.lane("free", settings.max_in_flight, settings.paced_free_min)
        self.chat_lane = self.governor.lane("interactive", settings.max_in_flight, settings.paced_chats_min)
        self.metrics.watch_governor(self.governor)
        self.in_flight = InFlightLimit(settings.max_in_flight)
        self.keys = KeyRegistry(self.file_keys, self.store)
        self.servicer = EdgeServicer(
            settings,
            self.keys,
            self.downstream,
            self.pipeline,
            self.jobs,
            self.store,
            self.metrics,
            ToolCalls(self.downstream),
            self.chat_lane,
            self.free_lane,
        )
        # The OpenAI-compatible face runs its requests through the same servicer (openai_http.py).
        self.http = HttpFront(
            OpenAIHttpApp(
                settings, self.keys, self.servicer, self.downstream, self.in_flight, telemetry, self.settler
            ),
            settings,
        )

    def service_names(self) -> Sequence[str]:
        return [
            edge_pb2.DESCRIPTOR.services_by_name[name].full_name
            for name in ("EdgeService", "EdgeAdminService")
        ]

    def interceptors(self) -> Sequence[grpc.aio.ServerInterceptor]:
        return [self.in_flight]

    def register(self, server: grpc.aio.Server) -> None:
        edge_pb2_grpc.add_EdgeServiceServicer_to_server(self.servicer, server)
        edge_pb2_grpc.add_EdgeAdminServiceServicer_to_server(
            EdgeAdminServicer(self.settings, self.store, self.file_keys), server
        )

    async def start(self) -> None:
        # The HTTP port is bound before anything starts, so a clash fails start-up at once.
        if self.settings.http_enabled:
            self.http.bind()
        await super().start()
        if self.settings.http_enabled:
            await self.http.serve()

    async def drain(self, grace: float) -> None:
        # The HTTP face drains its requests while the queue's running jobs finish.
        await asyncio.gather(self.http.drain(grace), super().drain(grace))

    async def close(self) -> None:
        await self.http.drain(self.server_settings.grace_period)
        await super().close()


class WorkerApp(_QueueApp):
    """`ballast serve worker`: the burst queue's workers apart from the public API.

    It serves only the health service (and Prometheus metrics): no API keys, no EdgeService.
    """

    name = "worker"

    def __init__(self, settings: WorkerSettings, telemetry: Telemetry) -> None:
        super().__init__(settings.edge, telemetry)
        self.metrics.watch_governor(self.governor)

    def service_names(self) -> Sequence[str]:
        return []

    def register(self, server: grpc.aio.Server) -> None:
        """Nothing but health: the worker takes its work from the queue, not from callers."""


def build(settings: EdgeSettings, telemetry: Telemetry) -> EdgeApp:
    return EdgeApp(settings, telemetry)


def build_worker(settings: WorkerSettings, telemetry: Telemetry) -> WorkerApp:
    return WorkerApp(settings, telemetry)


# How `python -m services.edge` and the all-in-one runner start this service.
ENTRY = Entry("edge", EdgeSettings.from_env, build)
# `ballast serve worker`: the queue's workers apart from the edge.
WORKER_ENTRY = Entry("worker", WorkerSettings.from_env, build_worker)
