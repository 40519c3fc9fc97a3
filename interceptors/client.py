"""The client side: one base class turns a concern into interceptors of all four kinds.

A concern implements ``before`` (may change the call details: metadata, timeout; may raise
to refuse the call) and ``after`` (sees the final status of the logical call, once, after
any native retries underneath). grpc.aio runs client interceptors once per logical call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc import aio


def with_metadata(details: aio.ClientCallDetails, *pairs: tuple[str, str]) -> aio.ClientCallDetails:
    """A copy of ``details`` with ``pairs`` added to its metadata."""
    metadata = aio.Metadata(*(details.metadata or ()))
    for key, value in pairs:
        metadata.add(key, value)
    return replace_details(details, metadata=metadata)


def replace_details(details: aio.ClientCallDetails, **changes: Any) -> aio.ClientCallDetails:
    fields: dict[str, Any] = {
        "method": details.method,
        "timeout": details.timeout,
        "metadata": details.metadata,
        "credentials": details.credentials,
        "wait_for_ready": details.wait_for_ready,
    }
    fields.update(changes)
    return aio.ClientCallDetails(**fields)


def method_name(details: aio.ClientCallDetails) -> str:
    method: str | bytes = details.method  # bytes at run time, whatever the stubs say
    return method.decode() if isinstance(method, bytes) else method


class ClientConcern(
    aio.UnaryUnaryClientInterceptor,
    aio.UnaryStreamClientInterceptor,
    aio.StreamUnaryClientInterceptor,
    aio.StreamStreamClientInterceptor,
):
    """Subclass and override ``before`` and/or ``after``."""

    def before(self, details: aio.ClientCallDetails) -> tuple[aio.ClientCallDetails, Any]:
        """Returns the details to call with and a token handed to ``after``."""
        return details, None

    def after(self, details: aio.ClientCallDetails, token: Any, code: grpc.StatusCode) -> None:
        """Called once with the final status of the call."""

    async def _finish(self, details: aio.ClientCallDetails, token: Any, call: Any) -> None:
        try:
            code = await call.code()
        except Exception:  # a call that never started
            code = grpc.StatusCode.UNKNOWN
        self.after(details, token, code)

    async def _intercept(
        self,
        continuation: Callable[..., Any],
        details: aio.ClientCallDetails,
        request: Any,
        unary_response: bool,
    ) -> Any:
        details, token = self.before(details)
        try:
            call = await continuation(details, request)
        except aio.AioRpcError as exc:
            self.after(details, token, exc.code())
            raise
        if not unary_response:
            # Streams end later; their status is read once they are done.
            call.add_done_callback(
                lambda done: asyncio.ensure_future(self._finish(details, token, done))
            )
            return call
        try:
            await call
        except aio.AioRpcError as exc:
            self.after(details, token, exc.code())
        except asyncio.CancelledError:
            self.after(details, token, grpc.StatusCode.CANCELLED)
            raise
        else:
            self.after(details, token, grpc.StatusCode.OK)
        return call  # awaiting it again gives the caller the response or the error

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await self._intercept(continuation, client_call_details, request, True)

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await self._intercept(continuation, client_call_details, request, False)

    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self._intercept(continuation, client_call_details, request_iterator, True)

    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self._intercept(continuation, client_call_details, request_iterator, False)


class _UnaryStreamOnly(aio.UnaryStreamClientInterceptor):
    def __init__(self, interceptor: aio.UnaryStreamClientInterceptor) -> None:
        self.interceptor = interceptor

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await self.interceptor.intercept_unary_stream(
            continuation, client_call_details, request
        )


class _StreamUnaryOnly(aio.StreamUnaryClientInterceptor):
    def __init__(self, interceptor: aio.StreamUnaryClientInterceptor) -> None:
        self.interceptor = interceptor

    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self.interceptor.intercept_stream_unary(
            continuation, client_call_details, request_iterator
        )


class _StreamStreamOnly(aio.StreamStreamClientInterceptor):
    def __init__(self, interceptor: aio.StreamStreamClientInterceptor) -> None:
        self.interceptor = interceptor

    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self.interceptor.intercept_stream_stream(
            continuation, client_call_details, request_iterator
        )


_KINDS: tuple[tuple[type, Callable[[Any], aio.ClientInterceptor]], ...] = (
    (aio.UnaryStreamClientInterceptor, _UnaryStreamOnly),
    (aio.StreamUnaryClientInterceptor, _StreamUnaryOnly),
    (aio.StreamStreamClientInterceptor, _StreamStreamOnly),
)


def for_every_kind(interceptors: Sequence[aio.ClientInterceptor]) -> list[aio.ClientInterceptor]:
    """The list to give a channel so each interceptor sees every kind of call it handles.

    grpc.aio files an interceptor under the FIRST kind it implements only (an if/elif in
    ``aio.Channel``), so a ClientConcern passed as is intercepts unary-unary calls and no
    streaming call at all. Here every further kind gets a thin adapter; order is kept.
    """
    found: list[aio.ClientInterceptor] = []
    for interceptor in interceptors:
        found.append(interceptor)
        filed_as_unary = isinstance(interceptor, aio.UnaryUnaryClientInterceptor)
        first = not filed_as_unary
        for kind, adapter in _KINDS:
            if isinstance(interceptor, kind):
                if first:  # grpc files the interceptor itself under this kind
                    first = False
                    continue
                found.append(adapter(interceptor))
    return found
