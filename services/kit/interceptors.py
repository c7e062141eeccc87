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


class AroundInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that runs `around(method)` around every call of a method.

    grpc.aio asks every interceptor for the handler on every call; a method's handler does not
    change, so each is wrapped once and the wrapped handler is reused (on the hot path that
    saves building closures and handler tuples per call).
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    def around(self, method: str) -> Around | None:
        """What to run around the calls of `method`; None leaves them alone."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        around = self.around(method)
        wrapped = handler if around is None else wrap_handler(handler, around)
        self._wrapped[method] = (handler, wrapped)
        return wrapped
