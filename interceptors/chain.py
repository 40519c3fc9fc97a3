"""The server chain: links wrap a method's behaviour once, then every call runs the result.

grpc.aio server interceptors only see the method name and must return a handler, so the
chain asks for the real handler, wraps its behaviour with every link (outermost first),
caches the wrapped handler per method, and hands it back. A call then pays for plain
function calls, not for a fresh interceptor walk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any

import grpc
from grpc import aio

from interceptors.method import MethodInfo, RpcKind, method_info

Behavior = Callable[..., Any]
# (request or None for client-streaming calls, context) -> None, raising to refuse the call
Check = Callable[[Any, aio.ServicerContext], Awaitable[None]]


_trailers: ContextVar[list[tuple[str, str | bytes]] | None] = ContextVar(
    "learnmesh_trailers", default=None
)


def add_trailer(context: aio.ServicerContext, key: str, value: str | bytes) -> None:
    """Adds trailing metadata to the call without dropping what other links added."""
    add_trailers(context, (key, value))


def add_trailers(context: aio.ServicerContext, *pairs: tuple[str, str | bytes]) -> None:
    """Adds several trailing metadata entries at once (one update of the call's trailers)."""
    found = _trailers.get()
    if found is None:
        found = []
        _trailers.set(found)
    found.extend(pairs)
    context.set_trailing_metadata(tuple(found))


_metadata: ContextVar[Any] = ContextVar("learnmesh_call_metadata", default=None)


def call_metadata(context: aio.ServicerContext) -> Any:
    """The call's invocation metadata, read once per call by the chain (asking the context
    builds a fresh tuple every time, which several links would otherwise each pay for)."""
    found = _metadata.get()
    return found if found is not None else context.invocation_metadata()


def trailers() -> tuple[tuple[str, str | bytes], ...]:
    """The trailing metadata links added to the current call (errors re-send it on abort)."""
    return tuple(_trailers.get() or ())


class ServerLink:
    """One concern of the server chain. Subclasses override ``wrap``."""

    def wrap(self, method: MethodInfo, behavior: Behavior) -> Behavior:
        return behavior


def kind_of(handler: grpc.RpcMethodHandler) -> RpcKind:
    if handler.request_streaming:
        return "stream_stream" if handler.response_streaming else "stream_unary"
    return "unary_stream" if handler.response_streaming else "unary_unary"


def behavior_of(handler: grpc.RpcMethodHandler) -> Behavior:
    return (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )


_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


async def stream_of(result: Any) -> AsyncIterator[Any]:
    """Response messages of a server-streaming behaviour, whether it yields or awaits."""
    if hasattr(result, "__aiter__"):
        async for message in result:
            yield message
    else:  # a coroutine that writes with context.write()
        await result


def guard(method: MethodInfo, behavior: Behavior, check: Check) -> Behavior:
    """Runs ``check`` before the behaviour; it sees the request for unary-request methods."""
    if method.kind == "unary_unary":

        async def unary_unary(request: Any, context: aio.ServicerContext) -> Any:
            await check(request, context)
            return await behavior(request, context)

        return unary_unary
    if method.kind == "unary_stream":

        async def unary_stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            await check(request, context)
            async for message in stream_of(behavior(request, context)):
                yield message

        return unary_stream
    if method.kind == "stream_unary":

        async def stream_unary(requests: Any, context: aio.ServicerContext) -> Any:
            await check(None, context)
            return await behavior(requests, context)

        return stream_unary

    async def stream_stream(requests: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        await check(None, context)
        async for message in stream_of(behavior(requests, context)):
            yield message

    return stream_stream


def around(
    method: MethodInfo,
    behavior: Behavior,
    on_error: Callable[[BaseException, aio.ServicerContext], Awaitable[None]],
) -> Behavior:
    """Runs the behaviour of any kind, handing exceptions to ``on_error`` (which re-raises
    or aborts)."""
    if method.kind in ("unary_unary", "stream_unary"):

        async def unary_response(request: Any, context: aio.ServicerContext) -> Any:
            try:
                return await behavior(request, context)
            except BaseException as exc:
                await on_error(exc, context)
                raise

        return unary_response

    async def streaming_response(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for message in stream_of(behavior(request, context)):
                yield message
        except BaseException as exc:
            await on_error(exc, context)
            raise

    return streaming_response


def each_request(method: MethodInfo, behavior: Behavior, check: Callable[[Any], None]) -> Behavior:
    """Applies the synchronous ``check`` to every request message, streamed or not."""
    if method.kind == "unary_unary":

        async def unary_unary(request: Any, context: aio.ServicerContext) -> Any:
            check(request)
            return await behavior(request, context)

        return unary_unary
    if method.kind == "unary_stream":

        async def unary_stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            check(request)
            async for message in stream_of(behavior(request, context)):
                yield message

        return unary_stream

    async def checked(requests: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        # Handlers read through the iterator; a None iterator means they use context.read().
        source = requests if requests is not None else _read_all(context)
        async for request in source:
            check(request)
            yield request

    if method.kind == "stream_unary":

        async def stream_unary(requests: Any, context: aio.ServicerContext) -> Any:
            return await behavior(checked(requests, context), context)

        return stream_unary

    async def stream_stream(requests: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        async for message in stream_of(behavior(checked(requests, context), context)):
            yield message

    return stream_stream


async def _read_all(context: aio.ServicerContext) -> AsyncIterator[Any]:
    while (message := await context.read()) is not aio.EOF:
        yield message


class ServerChain(aio.ServerInterceptor):
    """Applies the links, outermost first, to every method the server serves."""

    def __init__(self, links: Sequence[ServerLink]) -> None:
        self.links = list(links)
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        # Set here, it reaches the handler's context (grpc runs both in the call's task).
        _metadata.set(handler_call_details.invocation_metadata or ())
        name = handler_call_details.method
        cached = self._cache.get(name)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap_handler(name, handler)
        self._cache[name] = (handler, wrapped)
        return wrapped

    def wrap_handler(self, name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        kind = kind_of(handler)
        method = method_info(name, kind)
        behavior = behavior_of(handler)
        for link in reversed(self.links):
            behavior = link.wrap(method, behavior)
        return _FACTORIES[kind](
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
