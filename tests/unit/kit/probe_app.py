"""A tiny service for testing the bootstrap itself: slow calls, errors, streams.

Run as a script (`python probe_app.py PORT`) it serves until SIGTERM through the same
`run_until_signal` every Ballast service uses.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from services.kit import errors
from services.kit.config import ServerSettings
from services.kit.server import ServiceApp, run_until_signal
from services.kit.telemetry import Telemetry, setup_telemetry

SERVICE = "ballast.test.v1.Probe"


def _fail(kind: str) -> None:
    if kind == "invalid":
        raise errors.InvalidArgument("messages[0].content", "must not be empty")
    if kind == "exhausted":
        raise errors.ResourceExhausted(
            "free tier: 20 requests per hour", retry_after=1.5, reason="requests_per_hour"
        )
    if kind == "aborted":
        raise errors.Aborted("session changed", current_version=7)
    if kind == "bug":
        raise ZeroDivisionError("secret internal detail")
    if kind == "unimplemented":
        raise NotImplementedError("Method not implemented!")


class ProbeApp(ServiceApp):
    name = "probe"

    def __init__(self, settings: ServerSettings, telemetry: Telemetry) -> None:
        super().__init__(settings, telemetry)
        self.closed = False
        # Set (and announced on stdout) when a Sleep call has arrived, so a test can stop the
        # server while that call is surely in flight instead of guessing how long arrival takes.
        self.sleeping = asyncio.Event()

    def service_names(self) -> Sequence[str]:
        return [SERVICE]

    def register(self, server: grpc.aio.Server) -> None:
        async def sleep(request: bytes, context: Any) -> bytes:
            self.sleeping.set()
            print("probe sleeping", flush=True)
            await asyncio.sleep(float(request.decode()))
            return b"slept"

        async def fail(request: bytes, context: Any) -> bytes:
            _fail(request.decode())
            return b"ok"

        async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
            yield b"first"
            _fail(request.decode())
            yield b"second"

        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
                        "Fail": grpc.unary_unary_rpc_method_handler(fail),
                        "Stream": grpc.unary_stream_rpc_method_handler(stream),
                    },
                )
            ]
        )

    async def close(self) -> None:
        self.closed = True
        print("probe closed", flush=True)


def make(port: int = 0, grace: float = 5.0) -> ProbeApp:
    settings = ServerSettings(service="probe", port=port, grace_period=grace)
    return ProbeApp(settings, setup_telemetry("probe", environ={"OTEL_SDK_DISABLED": "true"}))


if __name__ == "__main__":
    asyncio.run(run_until_signal([make(int(sys.argv[1]))]))
