"""Every handler shape grpc allows, brought to the one shape the chain's links wrap.

grpc accepts, for each of the four RPC kinds, a coroutine function, a plain function, an
async generator function or a plain generator function (or a function returning an
iterator), and a handler of a request-streaming method may read a plain iterator of
requests. The links are written for one shape per kind: a coroutine function for unary
responses, something ``stream_of`` can iterate (an async iterator, or a coroutine that
writes with ``context.write``) for streamed ones, and an async iterator of requests.
``canonical`` adapts the handler once, when the chain wraps it; async handlers (every
service of the mesh) pass through untouched, so the adaptation costs their calls nothing.

Synchronous handlers (grpc's own sync servicers, or a service written the sync way) never
run on the event loop: each call, and each step of a sync generator, runs in a worker
thread (with the call's context variables), reads streamed requests from the loop, and
sees a context whose coroutine methods (``abort``, ``read``, ``write``,
``send_initial_metadata``) block that thread instead of returning coroutines.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from grpc import aio

from interceptors.method import RpcKind

Behavior = Callable[..., Any]
_END = object()


async def stream_of(result: Any) -> AsyncIterator[Any]:
    """Response messages of a server-streaming behaviour, whether it yields or awaits."""
    if hasattr(result, "__aiter__"):
        async for message in result:
            yield message
        return
    returned = await result  # a coroutine that writes with context.write() ...
    if returned is None:
        return
    if hasattr(returned, "__aiter__"):  # ... or that returns the responses to send
        async for message in returned:
            yield message
    else:
        for message in returned:
            yield message


def canonical(kind: RpcKind, behavior: Behavior) -> Behavior:
    """``behavior`` in the shape the links expect for ``kind``."""
    request_streaming = kind.startswith("stream_")
    if kind.endswith("_unary"):
        if inspect.iscoroutinefunction(behavior):
            return behavior
        return _threaded_unary(behavior, request_streaming=request_streaming)
    if inspect.isasyncgenfunction(behavior) or inspect.iscoroutinefunction(behavior):
        return behavior
    return _threaded_stream(behavior, request_streaming=request_streaming)


async def _in_thread(
    behavior: Behavior,
    request: Any,
    context: aio.ServicerContext[Any, Any],
    *,
    request_streaming: bool,
) -> Any:
    """Calls a plain handler in a worker thread, with the blocking request iterator and
    context it expects."""
    loop = asyncio.get_running_loop()
    if request_streaming:
        request = SyncRequests(request, context, loop)
    return await asyncio.to_thread(behavior, request, SyncContext(context, loop))


def _threaded_unary(behavior: Behavior, *, request_streaming: bool) -> Behavior:
    async def unary_response(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        result = await _in_thread(behavior, request, context, request_streaming=request_streaming)
        if inspect.isawaitable(result):  # an async callable that inspect could not tell
            result = await result
        return result

    return unary_response


def _threaded_stream(behavior: Behavior, *, request_streaming: bool) -> Behavior:
    async def streaming_response(
        request: Any, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        result = await _in_thread(behavior, request, context, request_streaming=request_streaming)
        if inspect.isawaitable(result) or hasattr(result, "__aiter__"):
            async for message in stream_of(result):
                yield message
            return
        if result is None:
            return
        responses = iter(result)
        while (message := await asyncio.to_thread(next, responses, _END)) is not _END:
            yield message

    return streaming_response


class SyncRequests(Iterator[Any]):
    """The call's requests as a plain iterator, for a handler running in a worker thread."""

    def __init__(
        self,
        requests: Any,
        context: aio.ServicerContext[Any, Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._requests = requests
        self._context = context
        self._loop = loop

    async def _next(self) -> Any:
        if self._requests is None:
            return await self._context.read()
        try:
            return await anext(self._requests)
        except StopAsyncIteration:
            return aio.EOF

    def __next__(self) -> Any:
        message = asyncio.run_coroutine_threadsafe(self._next(), self._loop).result()
        if message is aio.EOF:
            raise StopIteration
        return message


class SyncContext:
    """The call's context for a handler running in a worker thread: its coroutine methods
    run on the event loop while the thread waits; everything else is the context's own."""

    def __init__(
        self, context: aio.ServicerContext[Any, Any], loop: asyncio.AbstractEventLoop
    ) -> None:
        self._context = context
        self._loop = loop

    def _wait(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def abort(self, code: Any, details: str = "", trailing_metadata: Any = ()) -> Any:
        return self._wait(self._context.abort(code, details, trailing_metadata))

    def read(self) -> Any:
        return self._wait(self._context.read())

    def write(self, message: Any) -> None:
        self._wait(self._context.write(message))

    def send_initial_metadata(self, metadata: Any) -> None:
        self._wait(self._context.send_initial_metadata(metadata))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)
