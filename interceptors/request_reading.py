"""Where the chain reads the request of a unary-request method: grpc registers the method
as request-streaming (``unary_request_handler``), so the links run before the message
arrives, holding a ``PendingRequest``; ``reading_request`` reads it just inside the link
that asks for it (interceptors/requests.py says why)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc import aio

from interceptors.link import Behavior
from interceptors.method import MethodInfo
from interceptors.requests import PendingRequest
from interceptors.shapes import stream_of


def reading_request(method: MethodInfo, behavior: Behavior) -> Behavior:
    """Reads the pending request before ``behavior`` runs (placed where no link outside it
    has read it, so the request is always still pending here)."""
    if method.kind == "unary_unary":

        async def unary_unary(
            pending: PendingRequest, context: aio.ServicerContext[Any, Any]
        ) -> Any:
            return await behavior(await pending.read(), context)

        return unary_unary

    async def unary_stream(
        pending: PendingRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for message in stream_of(behavior(await pending.read(), context)):
            yield message

    return unary_stream


def unary_request_handler(
    method: MethodInfo,
    behavior: Behavior,
    deserializer: Callable[[bytes], Any] | None,
    serializer: Callable[[Any], bytes] | None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """The grpc handler of a unary-request method: request-streaming on the wire, so the
    chain starts when the call does, with a ``PendingRequest`` for the links."""
    if method.kind == "unary_unary":

        async def unary_response(_requests: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            return await behavior(PendingRequest(context), context)

        return grpc.stream_unary_rpc_method_handler(
            unary_response, request_deserializer=deserializer, response_serializer=serializer
        )

    async def streaming_response(
        _requests: Any, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for message in stream_of(behavior(PendingRequest(context), context)):
            yield message

    return grpc.stream_stream_rpc_method_handler(
        streaming_response, request_deserializer=deserializer, response_serializer=serializer
    )
