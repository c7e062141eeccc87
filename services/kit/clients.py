"""gRPC channels from one service to another, traced and sized like the servers."""

from __future__ import annotations

import grpc

from services.kit.config import ServerSettings
from services.kit.telemetry import Telemetry


def channel_target(address: str) -> str:
    """The gRPC target for an address setting: replicas listed as host:port,host:port become
    one ipv4: target that the channel balances round robin; anything else is used as given."""
    if "," in address and not address.startswith(("dns:", "ipv4:", "ipv6:", "unix:")):
        return "ipv4:" + ",".join(part.strip() for part in address.split(","))
    return address


def open_channel(address: str, settings: ServerSettings, telemetry: Telemetry) -> grpc.aio.Channel:
    """An insecure channel with W3C trace propagation and the suite's message limits.

    Calls are spread round robin over every address the target resolves to (replicas behind
    a DNS name or listed in the setting), and a replica that goes away is skipped.
    """
    return grpc.aio.insecure_channel(
        channel_target(address),
        interceptors=telemetry.client_interceptors(),
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.enable_retries", 1),
            ("grpc.lb_policy_name", "round_robin"),
        ],
    )
