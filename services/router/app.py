"""Composition root of the router service: builds its parts and registers the servicer."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from ballast.router.v1 import router_pb2, router_pb2_grpc

from services.kit.server import ServiceApp
from services.kit.telemetry import Telemetry
from services.router.config import RouterSettings


class RouterApp(ServiceApp):
    name = "router"

    def __init__(self, settings: RouterSettings, telemetry: Telemetry) -> None:
        super().__init__(settings.server, telemetry)
        self.settings = settings

    def service_names(self) -> Sequence[str]:
        return [router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name]

    def register(self, server: grpc.aio.Server) -> None:
        # Until the service logic lands, every method answers UNIMPLEMENTED.
        router_pb2_grpc.add_RouterServiceServicer_to_server(router_pb2_grpc.RouterServiceServicer(), server)  # type: ignore[abstract]


def build(settings: RouterSettings, telemetry: Telemetry) -> RouterApp:
    return RouterApp(settings, telemetry)
