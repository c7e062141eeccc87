"""Composition root of the cache service: store, embedder, engine and servicer."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import grpc
from ballast.cache.v1 import cache_pb2, cache_pb2_grpc

from services.cache.cache import CacheEngine
from services.cache.config import CacheSettings
from services.cache.embedder import Embedder, LocalEmbedder, RouterEmbedder
from services.cache.index import AnnParams
from services.cache.servicer import CacheServicer
from services.cache.store import CacheStore, StoreOptions, open_store
from services.kit.clients import open_channel
from services.kit.entry import Entry
from services.kit.server import BackendProbe, ServiceApp
from services.kit.telemetry import Telemetry, store_address, store_system, trace_store


def make_embedder(settings: CacheSettings, telemetry: Telemetry) -> Embedder:
    if settings.embedder == "router":
        channel = open_channel(settings.server.addresses["router"], settings.server, telemetry)
        return RouterEmbedder(channel, settings.router_embed_model, timeout=settings.embed_timeout)
    return LocalEmbedder(
        settings.model_path,
        settings.tokenizer_path,
        threads=settings.embed_threads,
        max_tokens=settings.embed_max_tokens,
        int8_weights=settings.embed_int8_weights,
        calibrated_int8=settings.embed_calibrated_int8,
        preload=settings.preload_embedder,
    )


def make_store(settings: CacheSettings) -> CacheStore:
    return open_store(
        settings.store_url,
        StoreOptions(
            max_bytes=settings.max_bytes,
            max_tenant_bytes=settings.max_tenant_bytes,
            tenant_max_bytes=settings.policy.tenant_max_bytes,
            ann=AnnParams(
                threshold=settings.ann_threshold,
                m=settings.ann_m,
                ef_construction=settings.ann_ef_construction,
                ef=settings.ann_ef,
            ),
            sync_block=settings.sync_block,
            stream_maxlen=settings.stream_maxlen,
            pool_size=settings.store_pool_size,
            timeout=settings.store_timeout,
        ),
    )


class CacheApp(ServiceApp):
    name = "cache"

    def __init__(self, settings: CacheSettings, telemetry: Telemetry) -> None:
        super().__init__(settings.server, telemetry)
        self.settings = settings
        self.store = make_store(settings)
        trace_store(
            self.store, telemetry, store_system(settings.store_url), store_address(settings.store_url)
        )
        self.embedder = make_embedder(settings, telemetry)
        # Tests replace `clock` with a fake one; the engine reads it on every call.
        self.clock: Callable[[], float] = time.time
        self.engine = CacheEngine(settings, self.store, self.embedder, clock=lambda: self.clock())

    def service_names(self) -> Sequence[str]:
        return [cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name]

    def register(self, server: grpc.aio.Server) -> None:
        cache_pb2_grpc.add_CacheServiceServicer_to_server(
            CacheServicer(self.engine, self.telemetry.meter), server
        )

    async def start(self) -> None:
        await self.store.start()
        # Loads the model in a background thread: the port opens without waiting for it.
        await self.embedder.start()

    def ready(self) -> Awaitable[None] | None:
        # Semantic lookups need the embedder: NOT_SERVING until the model has loaded.
        return self.embedder.ready()

    def backend_probes(self) -> Mapping[str, BackendProbe]:
        # A Redis store is required: without it lookups and stores answer UNAVAILABLE.
        return {} if self.settings.store_url.startswith("memory:") else {"redis": self.store.ping}

    async def close(self) -> None:
        await self.embedder.close()
        await self.store.close()


def build(settings: CacheSettings, telemetry: Telemetry) -> CacheApp:
    return CacheApp(settings, telemetry)


# How `python -m services.cache` and the all-in-one runner start this service.
ENTRY = Entry("cache", CacheSettings.from_env, build)
