"""gRPC channels from one service to another, traced and sized like the servers."""

from __future__ import annotations

import grpc

from services.kit.config import ServerSettings
from services.kit.telemetry import Telemetry


def open_channel(address: str, settings: ServerSettings, telemetry: Telemetry) -> grpc.aio.Channel:
    """An insecure channel with W3C trace propagation and the suite's message limits."""
    return grpc.aio.insecure_channel(
        address,
        interceptors=telemetry.client_interceptors(),
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.enable_retries", 1),
        ],
    )
