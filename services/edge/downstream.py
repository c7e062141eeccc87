"""The edge's clients of the four internal services, with deadlines and error mapping.

Every call gets a timeout: the caller's remaining deadline for the router, and the
shorter of that and BALLAST_EDGE_DOWNSTREAM_TIMEOUT for the others (for callers of normal or
higher priority, BALLAST_EDGE_PRIORITY_CALL_TIMEOUT when that is longer). A downstream
status the client can act on (INVALID_ARGUMENT, NOT_FOUND, ABORTED, ...) is passed on
with its details; a dead or timing-out service becomes UNAVAILABLE naming it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from ballast.cache.v1 import cache_pb2_grpc
from ballast.common.v1 import common_pb2
from ballast.limiter.v1 import limiter_pb2_grpc
from ballast.router.v1 import router_pb2_grpc
from ballast.sessions.v1 import sessions_pb2_grpc
from grpc_status import rpc_status

from services.edge.config import EdgeSettings
from services.kit.clients import open_channel
from services.kit.errors import BallastError, DeadlineExceeded, Forwarded, Unavailable
from services.kit.telemetry import Telemetry

T = TypeVar("T")

# Statuses a client can act on are passed through; the rest mean "that service is not working".
_PASS_THROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}


def map_rpc_error(service: str, error: grpc.aio.AioRpcError) -> BallastError:
    code = error.code()
    message = error.details() or code.name
    if code in _PASS_THROUGH:
        status = rpc_status.from_call(error)
        details = list(status.details) if status is not None else []
        return Forwarded(code, message, details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{service} did not answer before the deadline")
    if code == grpc.StatusCode.INTERNAL:
        return Forwarded(code, f"{service}: {message}", [])
    return Unavailable(f"{service} is unavailable ({code.name.lower()}: {message})")


class Deadline:
    """The caller's absolute deadline (monotonic), or None when the caller set none."""

    def __init__(self, remaining: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.at = None if remaining is None else clock() + remaining

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - self._clock())

    def cap(self, timeout: float) -> float:
        left = self.remaining()
        return timeout if left is None else min(timeout, left)


class Downstream:
    """Stubs of router, limiter, cache and sessions over traced channels."""

    def __init__(self, settings: EdgeSettings, telemetry: Telemetry) -> None:
        self._settings = settings
        addresses = settings.server.addresses
        self._channels = {
            name: open_channel(addresses[name], settings.server, telemetry)
            for name in ("router", "limiter", "cache", "sessions")
        }
        self.router = router_pb2_grpc.RouterServiceStub(self._channels["router"])
        self.limiter = limiter_pb2_grpc.LimiterServiceStub(self._channels["limiter"])
        self.cache = cache_pb2_grpc.CacheServiceStub(self._channels["cache"])
        self.sessions = sessions_pb2_grpc.SessionsServiceStub(self._channels["sessions"])

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    def call_timeout(self, caller: common_pb2.Caller | None = None) -> float:
        """How long one internal call made for `caller` may take, before the caller's deadline.

        Low priority (free) fails fast and gives way; normal and higher (paid, enterprise) may
        take up to BALLAST_EDGE_PRIORITY_CALL_TIMEOUT of the caller's deadline, so a replica
        short of CPU slows their calls down rather than failing them.
        """
        settings = self._settings
        if caller is None or settings.tier_priorities.get(caller.tier, "normal") == "low":
            return settings.downstream_timeout
        return max(settings.downstream_timeout, settings.priority_call_timeout)

    def timeout(self, deadline: Deadline, caller: common_pb2.Caller | None = None) -> float:
        return deadline.cap(self.call_timeout(caller))

    async def call(
        self, service: str, call: Callable[..., Awaitable[T]], request: Any, seconds: float | None
    ) -> T:
        """One unary call with a gRPC timeout of `seconds`, statuses mapped for the edge's caller."""
        if seconds is not None and seconds <= 0:
            raise DeadlineExceeded(f"no time left to call {service}")
        try:
            return await call(request, timeout=seconds)
        except grpc.aio.AioRpcError as error:
            raise map_rpc_error(service, error) from None

    async def stream(
        self, service: str, call: Callable[..., Any], request: Any, seconds: float | None
    ) -> AsyncIterator[Any]:
        if seconds is not None and seconds <= 0:
            raise DeadlineExceeded(f"no time left to call {service}")
        try:
            async for item in call(request, timeout=seconds):
                yield item
        except grpc.aio.AioRpcError as error:
            raise map_rpc_error(service, error) from None
