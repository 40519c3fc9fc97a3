"""The server chain: links wrap a method's behaviour once, then every call runs the result.

``chain.applied_to(server)`` is a stand-in for the server that the generated
``add_*Servicer_to_server`` functions (and grpc's health and reflection helpers) register
with: each method's handler is wrapped with every link (outermost first) on its first
call and cached, so a call pays for one dictionary lookup and plain function calls, no
interceptor walk. The chain is also a grpc.aio ``ServerInterceptor``
(``aio.server(interceptors=[chain])``) for servers built elsewhere; that path costs a few
percent of a trivial call more.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any, cast

import grpc
from grpc import aio

from interceptors.method import MethodInfo, RpcKind, method_info
from interceptors.requests import PendingRequest, decoding
from interceptors.shapes import canonical, stream_of

Behavior = Callable[..., Any]
# (request or None for client-streaming calls, context) -> None, raising to refuse the call
Check = Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[None]]
SyncCheck = Callable[[Any, aio.ServicerContext[Any, Any]], None]


_trailers: ContextVar[list[tuple[str, str | bytes]] | None] = ContextVar(
    "learnmesh_trailers", default=None
)


def add_trailer(context: aio.ServicerContext[Any, Any], key: str, value: str | bytes) -> None:
    """Adds trailing metadata to the call without dropping what other links added."""
    found = _trailers.get()
    if found is None:
        found = []
        _trailers.set(found)
    found.append((key, value))
    context.set_trailing_metadata(tuple(found))


def add_trailers(context: aio.ServicerContext[Any, Any], *pairs: tuple[str, str | bytes]) -> None:
    """Adds several trailing metadata entries at once (one update of the call's trailers)."""
    found = _trailers.get()
    if found is None:
        found = []
        _trailers.set(found)
    found.extend(pairs)
    context.set_trailing_metadata(tuple(found))


# (owner, the call's invocation metadata). The owner is None when grpc's handler lookup
# handed the metadata over (it runs in the call's own task, just before the handler), else
# the context it was read from, so a value left in a task that serves several calls (tests,
# the benchmark) is never taken for another call's.
_metadata: ContextVar[tuple[Any, Any] | None] = ContextVar("learnmesh_call_metadata", default=None)


def call_metadata(context: aio.ServicerContext[Any, Any]) -> Any:
    """The call's invocation metadata, read once per call (asking the context builds a fresh
    tuple every time, which several links would otherwise each pay for)."""
    found = _metadata.get()
    if found is not None and (found[0] is None or found[0] is context):
        return found[1]
    metadata = context.invocation_metadata() or ()
    _metadata.set((context, metadata))
    return metadata


def _keep_metadata(handler_call_details: grpc.HandlerCallDetails) -> None:
    _metadata.set((None, handler_call_details.invocation_metadata or ()))


def trailers() -> tuple[tuple[str, str | bytes], ...]:
    """The trailing metadata links added to the current call (errors re-send it on abort)."""
    return tuple(_trailers.get() or ())


class ServerLink:
    """One concern of the server chain. Subclasses override ``wrap``.

    ``needs_request``: the link looks at the request message of unary-request calls, so the
    chain reads it (a ``PendingRequest`` until then) before the link runs. A link that does
    not (request ids, tracing, metrics, error mapping) lets the read happen further in.
    ``reads_request``: the link reads a ``PendingRequest`` itself (the deadline link, so that
    the read runs under the call's deadline).
    """

    needs_request: bool = True
    reads_request: bool = False

    def wrap(self, method: MethodInfo, behavior: Behavior) -> Behavior:
        return behavior


def kind_of(handler: grpc.RpcMethodHandler[Any, Any]) -> RpcKind:
    if handler.request_streaming:
        return "stream_stream" if handler.response_streaming else "stream_unary"
    return "unary_stream" if handler.response_streaming else "unary_unary"


def behavior_of(handler: grpc.RpcMethodHandler[Any, Any]) -> Behavior:
    behavior = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    if behavior is None:
        raise TypeError(f"a method handler with no behaviour: {handler!r}")
    return behavior


_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def guard(method: MethodInfo, behavior: Behavior, check: Check | SyncCheck) -> Behavior:
    """Runs ``check`` before the behaviour; it sees the request for unary-request methods.

    ``check`` may be a coroutine function or a plain one; a plain one costs the call no
    coroutine of its own.
    """
    if not inspect.iscoroutinefunction(check):
        return _guard_sync(method, behavior, check)  # type: ignore[arg-type]
    if method.kind == "unary_unary":

        async def unary_unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            await check(request, context)
            return await behavior(request, context)

        return unary_unary
    if method.kind == "unary_stream":

        async def unary_stream(
            request: Any, context: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            await check(request, context)
            async for message in stream_of(behavior(request, context)):
                yield message

        return unary_stream
    if method.kind == "stream_unary":

        async def stream_unary(requests: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            await check(None, context)
            return await behavior(requests, context)

        return stream_unary

    async def stream_stream(
        requests: Any, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await check(None, context)
        async for message in stream_of(behavior(requests, context)):
            yield message

    return stream_stream


def _guard_sync(method: MethodInfo, behavior: Behavior, check: SyncCheck) -> Behavior:
    if method.kind == "unary_unary":

        async def unary_unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            check(request, context)
            return await behavior(request, context)

        return unary_unary
    if method.kind == "unary_stream":

        async def unary_stream(
            request: Any, context: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            check(request, context)
            async for message in stream_of(behavior(request, context)):
                yield message

        return unary_stream
    if method.kind == "stream_unary":

        async def stream_unary(requests: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            check(None, context)
            return await behavior(requests, context)

        return stream_unary

    async def stream_stream(
        requests: Any, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        check(None, context)
        async for message in stream_of(behavior(requests, context)):
            yield message

    return stream_stream


def around(
    method: MethodInfo,
    behavior: Behavior,
    on_error: Callable[[BaseException, aio.ServicerContext[Any, Any]], Awaitable[None]],
) -> Behavior:
    """Runs the behaviour of any kind, handing exceptions to ``on_error`` (which re-raises
    or aborts)."""
    if method.kind in ("unary_unary", "stream_unary"):

        async def unary_response(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await behavior(request, context)
            except BaseException as exc:
                await on_error(exc, context)
                raise

        return unary_response

    async def streaming_response(
        request: Any, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
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

        async def unary_unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            check(request)
            return await behavior(request, context)

        return unary_unary
    if method.kind == "unary_stream":

        async def unary_stream(
            request: Any, context: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            check(request)
            async for message in stream_of(behavior(request, context)):
                yield message

        return unary_stream

    async def checked(requests: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        # Handlers read through the iterator; a None iterator means they use context.read().
        source = requests if requests is not None else _read_all(context)
        async for request in source:
            check(request)
            yield request

    if method.kind == "stream_unary":

        async def stream_unary(requests: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            return await behavior(checked(requests, context), context)

        return stream_unary

    async def stream_stream(
        requests: Any, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for message in stream_of(behavior(checked(requests, context), context)):
            yield message

    return stream_stream


async def _read_all(context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
    while (message := await context.read()) is not aio.EOF:
        yield message


class ServerChain(aio.ServerInterceptor):
    """Applies the links, outermost first, to every method the server serves."""

    def __init__(self, links: Sequence[ServerLink]) -> None:
        self.links = list(links)
        self._cache: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}

    def applied_to(self, server: aio.Server) -> aio.Server:
        """``server`` as services should see it: what they register is wrapped first."""
        # A ChainedServer stands in for the aio.Server it wraps (registration wrapped, the
        # rest passed on): typed as one, it goes wherever generated code takes a server.
        return cast(aio.Server, ChainedServer(server, self))

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        _keep_metadata(handler_call_details)
        return self.wrapped(handler_call_details.method, handler)

    def wrapped(
        self, name: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` of method ``name`` wrapped by the links, made once per handler."""
        cached = self._cache.get(name)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap_handler(name, handler)
        self._cache[name] = (handler, wrapped)
        return wrapped

    def wrap_handler(
        self, name: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        kind = kind_of(handler)
        method = method_info(name, kind)
        behavior = canonical(kind, behavior_of(handler))
        links = self.links
        type_name = method.request_type.DESCRIPTOR.full_name if method.request_type else "request"
        deserializer = decoding(handler.request_deserializer, type_name)
        if kind.startswith("stream_"):
            for link in reversed(links):
                behavior = link.wrap(method, behavior)
            return _FACTORIES[kind](
                behavior,
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        # Unary request: registered as request-streaming, so the links hold the call before
        # its message arrives; read where the first link that needs it says.
        first = next(
            (i for i, link in enumerate(links) if link.needs_request or link.reads_request),
            len(links),
        )
        if first == len(links):
            behavior = _reading(method, behavior)
        for index in range(len(links) - 1, -1, -1):
            behavior = links[index].wrap(method, behavior)
            if index == first and not links[index].reads_request:
                behavior = _reading(method, behavior)
        return _entry(method, behavior, deserializer, handler.response_serializer)


def _reading(method: MethodInfo, behavior: Behavior) -> Behavior:
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


def _entry(
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


class _ChainedHandlers(grpc.GenericRpcHandler):
    """A generic handler whose methods come out wrapped by the chain."""

    def __init__(self, inner: grpc.GenericRpcHandler, chain: ServerChain) -> None:
        self.inner = inner
        self.chain = chain

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = self.inner.service(handler_call_details)
        if handler is None:
            return None
        _keep_metadata(handler_call_details)
        return self.chain.wrapped(handler_call_details.method, handler)


class ChainedServer:
    """A grpc.aio server as services register with it: their handlers are wrapped by the
    chain on the way in. Anything else (ports, start, stop) goes to the server itself.

    Methods are served through the generic handlers only; the registered-method tables
    that generated code also offers are not passed on. Through the generic path grpc hands
    each call's metadata to the lookup, where the chain keeps it for the links; measured
    here (benchmarks.run's servers, alternating runs), the full chain served 6-10 % more
    calls that way than through registered methods.
    """

    def __init__(self, server: aio.Server, chain: ServerChain) -> None:
        self.server = server
        self.chain = chain

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers([_ChainedHandlers(h, self.chain) for h in handlers])

    def add_registered_method_handlers(
        self, _service_name: str, _method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Not passed on: the same methods arrive through add_generic_rpc_handlers."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)
