"""Composition root of the sessions service: builds its parts and registers the servicer."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from ballast.sessions.v1 import sessions_pb2, sessions_pb2_grpc

from services.kit.server import ServiceApp
from services.kit.telemetry import Telemetry
from services.sessions.config import SessionsSettings


class SessionsApp(ServiceApp):
    name = "sessions"

    def __init__(self, settings: SessionsSettings, telemetry: Telemetry) -> None:
        super().__init__(settings.server, telemetry)
        self.settings = settings

    def service_names(self) -> Sequence[str]:
        return [sessions_pb2.DESCRIPTOR.services_by_name["SessionsService"].full_name]

    def register(self, server: grpc.aio.Server) -> None:
        # Until the service logic lands, every method answers UNIMPLEMENTED.
        sessions_pb2_grpc.add_SessionsServiceServicer_to_server(
            sessions_pb2_grpc.SessionsServiceServicer(),  # type: ignore[abstract]
            server,
        )


def build(settings: SessionsSettings, telemetry: Telemetry) -> SessionsApp:
    return SessionsApp(settings, telemetry)
