"""A client that cancels its call is routine: the call is recorded as CANCELLED and logged at
debug, never as an UNKNOWN status or an ERROR with a traceback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.kit.errors import DeadlineExceeded, ErrorInterceptor
from services.kit.interceptors import Around, AroundInterceptor, Context
from services.kit.server import MetricsInterceptor


def _status_codes(reader: InMemoryMetricReader) -> list[str]:
    data = reader.get_metrics_data()
    codes: list[str] = []
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    codes.append(str(dict(point.attributes or {}).get("rpc.grpc.status_code")))
    return codes


class Finished(AroundInterceptor):
    """Outermost: sets `done` once every other interceptor has finished with the call."""

    def __init__(self) -> None:
        super().__init__()
        self.done = asyncio.Event()

    def around(self, method: str) -> Around | None:
        @asynccontextmanager
        async def mark(context: Context) -> AsyncIterator[None]:
            try:
                yield
            finally:
                self.done.set()

        return mark


@pytest.mark.parametrize("method", ["Wait", "WaitThenFail"])
async def test_a_cancelled_call_is_cancelled_not_unknown_or_an_error(
    method: str, caplog: pytest.LogCaptureFixture
) -> None:
    started = asyncio.Event()

    async def wait(request: bytes, context: Context) -> bytes:
        started.set()
        await asyncio.Event().wait()
        return b""

    async def wait_then_fail(request: bytes, context: Context) -> bytes:
        # A driver that turns its cancellation into its own exception type.
        try:
            return await wait(request, context)
        except asyncio.CancelledError:
            raise RuntimeError("connection closed while reading") from None

    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    finished = Finished()
    server = grpc.aio.server(interceptors=[finished, MetricsInterceptor(meter), ErrorInterceptor()])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "t.T",
                {
                    "Wait": grpc.unary_unary_rpc_method_handler(wait),
                    "WaitThenFail": grpc.unary_unary_rpc_method_handler(wait_then_fail),
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    caplog.set_level(logging.DEBUG, "ballast.kit.errors")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub: Any = channel.unary_unary(f"/t.T/{method}")
            call = stub(b"")
            await asyncio.wait_for(started.wait(), timeout=30)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        await asyncio.wait_for(finished.done.wait(), timeout=30)
    finally:
        await server.stop(None)
    assert _status_codes(reader) == ["CANCELLED"]
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == [], [r.getMessage() for r in errors]
    assert any(r.levelno == logging.DEBUG and "cancelled" in r.getMessage() for r in caplog.records)


async def test_a_handlers_own_timeout_keeps_its_status() -> None:
    """`asyncio.timeout` works by cancelling the handler's task; the DEADLINE_EXCEEDED a handler
    raises from it is not the client cancelling."""

    async def times_out(request: bytes, context: Context) -> bytes:
        try:
            async with asyncio.timeout(0.01):
                await asyncio.Event().wait()
        except TimeoutError:
            raise DeadlineExceeded("waited too long for a slot") from None
        return b""

    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "t.T", {"TimesOut": grpc.unary_unary_rpc_method_handler(times_out)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub: Any = channel.unary_unary("/t.T/TimesOut")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub(b"", timeout=30)
    finally:
        await server.stop(None)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.details() == "waited too long for a slot"
