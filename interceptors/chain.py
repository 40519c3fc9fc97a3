"""The server chain: links wrap a method's behaviour once, then every call runs the result.

``chain.applied_to(server)`` is a stand-in for the server that the generated
``add_*Servicer_to_server`` functions (and grpc's health and reflection helpers) register
with: each method's handler is wrapped with every link (outermost first) on its first
call and cached, so a call pays for one dictionary lookup and plain function calls, no
interceptor walk. The chain is also a grpc.aio ``ServerInterceptor``
(``aio.server(interceptors=[chain])``) for servers built elsewhere; that path runs grpc's
interceptor walk on every call, which costs more.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import grpc
from grpc import aio

from interceptors.call_state import keep_metadata
from interceptors.link import Behavior, ServerLink
from interceptors.method import RpcKind, method_info
from interceptors.request_reading import reading_request, unary_request_handler
from interceptors.requests import decoding
from interceptors.shapes import canonical


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
        keep_metadata(handler_call_details)
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
            behavior = reading_request(method, behavior)
        for index in range(len(links) - 1, -1, -1):
            behavior = links[index].wrap(method, behavior)
            if index == first and not links[index].reads_request:
                behavior = reading_request(method, behavior)
        return unary_request_handler(method, behavior, deserializer, handler.response_serializer)


class _ChainedHandlers(grpc.GenericRpcHandler):
    """A generic handler whose methods come out wrapped by the chain."""

    def __init__(self, inner: grpc.GenericRpcHandler, chain: ServerChain) -> None:
        self.inner = inner
        self.chain = chain

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = self.inner.service(handler_call_details)
        if handler is None:
            return None
        keep_metadata(handler_call_details)
        return self.chain.wrapped(handler_call_details.method, handler)


class ChainedServer:
    """A grpc.aio server as services register with it: their handlers are wrapped by the
    chain on the way in. Anything else (ports, start, stop) goes to the server itself.

    Methods are served through the generic handlers only; the registered-method tables
    that generated code also offers are not passed on. Through the generic path grpc hands
    each call's metadata to the lookup, where the chain keeps it for the links; measured
    with benchmarks.run's servers, the full chain served more calls that way than through
    registered methods.
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
