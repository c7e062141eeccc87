"""Plumbing for server interceptors: run the same code around every call of a method,
whether it answers with one message or a stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, cast

import grpc

Context = grpc.aio.ServicerContext[Any, Any]
#: Given the call's context, what to enter before the method runs and exit after it ends.
Around = Callable[[Context], AbstractAsyncContextManager[object]]


def wrap_handler(handler: grpc.RpcMethodHandler[Any, Any], around: Around) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with every call run inside `around(context)`.

    A unary call is inside it until its response is made, a server stream until its last
    message is sent or it fails or is cancelled. Handlers with streaming requests (Ballast
    has none) are returned unwrapped.
    """
    # Under grpc.aio the behaviours are coroutines and async generators; the stubs describe
    # the sync API, hence the casts.
    if handler.unary_unary is not None:
        inner = cast(Callable[..., Awaitable[Any]], handler.unary_unary)

        async def unary(request: Any, context: Context) -> Any:
            async with around(context):
                return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        inner_stream = cast(Callable[..., AsyncIterator[Any]], handler.unary_stream)

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            async with around(context):
                async for item in inner_stream(request, context):
                    yield item

        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )
    return handler
