"""Composition root of the limiter service: builds its parts and registers the servicer."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from ballast.limiter.v1 import limiter_pb2, limiter_pb2_grpc

from services.kit.server import ServiceApp
from services.kit.telemetry import Telemetry
from services.limiter.config import LimiterSettings


class LimiterApp(ServiceApp):
    name = "limiter"

    def __init__(self, settings: LimiterSettings, telemetry: Telemetry) -> None:
        super().__init__(settings.server, telemetry)
        self.settings = settings

    def service_names(self) -> Sequence[str]:
        return [limiter_pb2.DESCRIPTOR.services_by_name["LimiterService"].full_name]

    def register(self, server: grpc.aio.Server) -> None:
        # Until the service logic lands, every method answers UNIMPLEMENTED.
        limiter_pb2_grpc.add_LimiterServiceServicer_to_server(
            limiter_pb2_grpc.LimiterServiceServicer(),  # type: ignore[abstract]
            server,
        )


def build(settings: LimiterSettings, telemetry: Telemetry) -> LimiterApp:
    return LimiterApp(settings, telemetry)
