"""gRPC channels from one service to another, traced and sized like the servers."""

from __future__ import annotations

from typing import Any

import grpc

from services.kit import local, tls
from services.kit.config import ServerSettings
from services.kit.telemetry import Telemetry
from services.kit.tracing import TracedChannel


def channel_target(address: str) -> str:
    """The gRPC target for an address setting: replicas listed as host:port,host:port become
    one ipv4: target that the channel balances round robin; anything else is used as given."""
    if "," in address and not address.startswith(("dns:", "ipv4:", "ipv6:", "unix:")):
        return "ipv4:" + ",".join(part.strip() for part in address.split(","))
    return address


def open_channel(address: str, settings: ServerSettings, telemetry: Telemetry) -> grpc.aio.Channel:
    """A channel with W3C trace propagation and the suite's message limits; mutual TLS with
    this service's certificate when BALLAST_TLS_* are set, plaintext otherwise.

    Calls are spread round robin over every address the target resolves to (replicas behind
    a DNS name or listed in the setting), and a replica that goes away is skipped. A plaintext
    channel to a server of this same process calls it in-process (services/kit/local.py)
    unless BALLAST_LOCAL_CALLS=false.
    """
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.enable_retries", 1),
        ("grpc.lb_policy_name", "round_robin"),
    ]
    target = channel_target(address)
    spans = telemetry.client_spans()
    if settings.client_tls is None:
        channel = grpc.aio.insecure_channel(target, options=options)
        if settings.local_calls:
            # A service of this same process (`ballast up`) is called without the socket; the
            # channel is there for when no server of this process listens at the address.
            return local.LocalFirstChannel(address, channel, settings.max_message_bytes, spans)
    else:
        name = _server_name(address, settings)
        if name:
            options.append(("grpc.ssl_target_name_override", name))
        channel = grpc.aio.secure_channel(
            target, tls.channel_credentials(settings.client_tls), options=options
        )
    return channel if spans is None else TracedChannel(channel, spans)


def _server_name(address: str, settings: ServerSettings) -> str:
    """The name to check the server's certificate against when the target has no single host.

    A list of replicas (host:port,host:port) is checked against the service's name, which
    every replica's certificate carries (`ballast certs` puts it in each), rather than one
    replica's address that the others' certificates would not hold.
    """
    if channel_target(address) == address:
        return ""
    for service, configured in settings.addresses.items():
        if configured == address:
            return service
    return address.split(",")[0].rpartition(":")[0]
