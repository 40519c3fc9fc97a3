"""The final status of a call, as seen by links that sit outside error mapping.

Tracing and metrics need the status the caller will receive, not the exception the handler
raised: after error mapping an error arrives as ``AbortError`` (the code is on the
context), a cancelled or timed-out call as ``CancelledError``, and a normal return is OK
unless the handler set a code itself. ``observe`` wraps a behaviour of any RPC kind so a
link gets one ``begin`` before the handler and exactly one ``end`` with that status, unless
``begin`` returned None: then the call has nothing to end and costs no ``end`` at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc import aio

from interceptors.link import Behavior
from interceptors.method import MethodInfo
from interceptors.shapes import stream_of

OK = grpc.StatusCode.OK
UNKNOWN = grpc.StatusCode.UNKNOWN
CANCELLED = grpc.StatusCode.CANCELLED
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
# A caller whose deadline passes resets the stream itself, which can reach the server a
# little before the server's own copy of the deadline (computed when the headers were read)
# runs out; a cancellation this close to the deadline is the deadline.
DEADLINE_SLACK = 0.1

# begin(context) -> state, or None for nothing to end; end(state, context, final code,
# exception or None)
Begin = Callable[[aio.ServicerContext[Any, Any]], Any]
End = Callable[[Any, aio.ServicerContext[Any, Any], grpc.StatusCode, BaseException | None], None]


def code_of_success(context: aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """OK, or the code a handler set with ``context.set_code`` before returning."""
    code: grpc.StatusCode | None = context.code()
    return code or OK


def code_of_error(exc: BaseException, context: aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """The status a caller receives when ``exc`` leaves the handler."""
    if isinstance(exc, aio.AbortError):
        code: grpc.StatusCode | None = context.code()
        return code or UNKNOWN
    # Once the caller's deadline has passed, grpc has ended the call with DEADLINE_EXCEEDED,
    # whatever the handler raised after that: cancellation (grpc cancels the handler on the
    # deadline as on a caller's cancel; only the remaining time tells them apart, and it is
    # None or huge without a deadline), or a failed attempt to send its own status.
    remaining: float | None = context.time_remaining()
    if remaining is not None and remaining < DEADLINE_SLACK:
        return DEADLINE_EXCEEDED
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return CANCELLED
    return UNKNOWN  # what grpc answers for an exception nobody mapped


def observe(method: MethodInfo, behavior: Behavior, begin: Begin, end: End) -> Behavior:
    """Wraps ``behavior`` so ``begin`` runs before it and ``end`` once with the final code
    (unless ``begin`` returned None)."""
    if method.kind in ("unary_unary", "stream_unary"):

        async def unary_response(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            state = begin(context)
            if state is None:
                return await behavior(request, context)
            try:
                response = await behavior(request, context)
            except BaseException as exc:
                end(state, context, code_of_error(exc, context), exc)
                raise
            end(state, context, code_of_success(context), None)
            return response

        return unary_response

    async def streaming_response(
        request: Any, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        state = begin(context)
        if state is None:
            async for message in stream_of(behavior(request, context)):
                yield message
            return
        try:
            async for message in stream_of(behavior(request, context)):
                yield message
        except BaseException as exc:
            end(state, context, code_of_error(exc, context), exc)
            raise
        end(state, context, code_of_success(context), None)

    return streaming_response
