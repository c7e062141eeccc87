"""Composition root of the edge service: builds its parts and registers the servicer."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from ballast.edge.v1 import edge_pb2, edge_pb2_grpc

from services.edge.config import EdgeSettings
from services.kit.server import ServiceApp
from services.kit.telemetry import Telemetry


class EdgeApp(ServiceApp):
    name = "edge"

    def __init__(self, settings: EdgeSettings, telemetry: Telemetry) -> None:
        super().__init__(settings.server, telemetry)
        self.settings = settings

    def service_names(self) -> Sequence[str]:
        return [
            edge_pb2.DESCRIPTOR.services_by_name[name].full_name
            for name in ("EdgeService", "EdgeAdminService")
        ]

    def register(self, server: grpc.aio.Server) -> None:
        # Until the service logic lands, every method answers UNIMPLEMENTED.
        edge_pb2_grpc.add_EdgeServiceServicer_to_server(edge_pb2_grpc.EdgeServiceServicer(), server)  # type: ignore[abstract]
        edge_pb2_grpc.add_EdgeAdminServiceServicer_to_server(edge_pb2_grpc.EdgeAdminServiceServicer(), server)  # type: ignore[abstract]


def build(settings: EdgeSettings, telemetry: Telemetry) -> EdgeApp:
    return EdgeApp(settings, telemetry)
