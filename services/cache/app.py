"""Composition root of the cache service: builds its parts and registers the servicer."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from ballast.cache.v1 import cache_pb2, cache_pb2_grpc

from services.cache.config import CacheSettings
from services.kit.server import ServiceApp
from services.kit.telemetry import Telemetry


class CacheApp(ServiceApp):
    name = "cache"

    def __init__(self, settings: CacheSettings, telemetry: Telemetry) -> None:
        super().__init__(settings.server, telemetry)
        self.settings = settings

    def service_names(self) -> Sequence[str]:
        return [cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name]

    def register(self, server: grpc.aio.Server) -> None:
        # Until the service logic lands, every method answers UNIMPLEMENTED.
        cache_pb2_grpc.add_CacheServiceServicer_to_server(cache_pb2_grpc.CacheServiceServicer(), server)  # type: ignore[abstract]


def build(settings: CacheSettings, telemetry: Telemetry) -> CacheApp:
    return CacheApp(settings, telemetry)
