"""AroundInterceptor: code around every call of a method, with each method's handler wrapped once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from services.kit.interceptors import Around, AroundInterceptor, Context


class Recorder(AroundInterceptor):
    def __init__(self) -> None:
        super().__init__()
        self.wrapped: list[str] = []
        self.events: list[str] = []

    def around(self, method: str) -> Around | None:
        if method.endswith("/Plain"):
            return None
        self.wrapped.append(method)

        @asynccontextmanager
        async def record(context: Context) -> AsyncIterator[None]:
            self.events.append(f"enter {method}")
            yield
            self.events.append(f"exit {method}")

        return record


def _handlers() -> grpc.GenericRpcHandler:
    async def echo(request: bytes, context: Context) -> bytes:
        return request

    async def count(request: bytes, context: Context) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()

    return grpc.method_handlers_generic_handler(
        "t.T",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Plain": grpc.unary_unary_rpc_method_handler(echo),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        },
    )


async def test_each_method_is_wrapped_once_and_every_call_runs_inside() -> None:
    recorder = Recorder()
    server = grpc.aio.server(interceptors=[recorder])
    server.add_generic_rpc_handlers([_handlers()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo: Any = channel.unary_unary("/t.T/Echo")
            plain: Any = channel.unary_unary("/t.T/Plain")
            count: Any = channel.unary_stream("/t.T/Count")
            for i in range(3):
                assert await echo(str(i).encode()) == str(i).encode()
                assert await plain(b"p") == b"p"
            assert [m async for m in count(b"3")] == [b"0", b"1", b"2"]
    finally:
        await server.stop(None)
    assert recorder.wrapped == ["/t.T/Echo", "/t.T/Count"]
    assert recorder.events == ["enter /t.T/Echo", "exit /t.T/Echo"] * 3 + [
        "enter /t.T/Count",
        "exit /t.T/Count",
    ]
