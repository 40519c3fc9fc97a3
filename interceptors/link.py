"""A server link and the wrappers links are written with: a check before the behaviour
(``guard``), a hand on its exceptions (``around``), a check of every request message
(``each_request``), each for the four RPC kinds."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from grpc import aio

from interceptors.method import MethodInfo
from interceptors.shapes import stream_of

Behavior = Callable[..., Any]
# (request or None for client-streaming calls, context) -> None, raising to refuse the call
Check = Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[None]]
SyncCheck = Callable[[Any, aio.ServicerContext[Any, Any]], None]


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
