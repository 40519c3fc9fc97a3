"""The client's metrics link: the gRPC client metrics of every outbound call.

A call counts as started when it is made and as handled once, with the final status the
caller gets (after any native retries underneath, which grpc runs below the interceptors),
when it ends; the time between goes to the handling histogram. Streamed messages are
counted as the caller's request iterator yields them and as the caller reads responses; a
unary direction counts one message per call, derived from the call counts when scraped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio
from prometheus_client import REGISTRY, CollectorRegistry

from interceptors.client import method_name
from interceptors.method import RpcKind, split
from interceptors.metrics.collector import CallStats, MethodSeries, call_stats

_OK = grpc.StatusCode.OK
_CANCELLED = grpc.StatusCode.CANCELLED
_UNKNOWN = grpc.StatusCode.UNKNOWN
_finishing: set[asyncio.Future[None]] = set()


class ClientMetrics(
    aio.UnaryUnaryClientInterceptor,
    aio.UnaryStreamClientInterceptor,
    aio.StreamUnaryClientInterceptor,
    aio.StreamStreamClientInterceptor,
):
    """gRPC client metrics; the default registry unless given. Give a channel
    ``for_every_kind([..., ClientMetrics(), ...])`` so streaming calls are seen too."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.stats: CallStats = call_stats(registry if registry is not None else REGISTRY, "client")
        # Per kind: the method as grpc hands it over (bytes) -> its series.
        self._series: dict[RpcKind, dict[Any, MethodSeries]] = {
            "unary_unary": {},
            "unary_stream": {},
            "stream_unary": {},
            "stream_stream": {},
        }

    def _series_of(self, kind: RpcKind, details: aio.ClientCallDetails) -> MethodSeries:
        table = self._series[kind]
        found = table.get(details.method)
        if found is None:
            service, name = split(method_name(details))
            found = table[details.method] = self.stats.series_for(kind, service, name)
        return found

    async def _unary_response(
        self,
        series: MethodSeries,
        continuation: Any,
        details: aio.ClientCallDetails,
        request: Any,
        counted_response: bool,
    ) -> Any:
        series.started += 1
        started = time.perf_counter()
        try:
            call = await continuation(details, request)
        except BaseException as exc:  # refused before it began (a breaker), or cancelled
            series.finish(_code_of(exc), time.perf_counter() - started)
            raise
        try:
            await call
        except aio.AioRpcError as exc:
            series.finish(exc.code(), time.perf_counter() - started)
            return call  # awaiting it again gives the caller the error
        except BaseException as exc:
            series.finish(_code_of(exc), time.perf_counter() - started)
            raise
        series.finish(_OK, time.perf_counter() - started)
        if counted_response:
            series.received += 1
        return call  # awaiting it again gives the caller the response

    async def _streaming_response(
        self, series: MethodSeries, continuation: Any, details: aio.ClientCallDetails, request: Any
    ) -> Any:
        series.started += 1
        started = time.perf_counter()
        try:
            call = await continuation(details, request)
        except BaseException as exc:
            series.finish(_code_of(exc), time.perf_counter() - started)
            raise

        def ended(done: Any) -> None:
            elapsed = time.perf_counter() - started
            task = asyncio.ensure_future(_finish_later(series, done, elapsed))
            _finishing.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(_finishing.discard)

        call.add_done_callback(ended)
        return _counted_responses(call, series)

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        series = self._series_of("unary_unary", client_call_details)
        return await self._unary_response(series, continuation, client_call_details, request, False)

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        series = self._series_of("unary_stream", client_call_details)
        return await self._streaming_response(series, continuation, client_call_details, request)

    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        series = self._series_of("stream_unary", client_call_details)
        requests = _counted_requests(request_iterator, series)
        return await self._unary_response(series, continuation, client_call_details, requests, True)

    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        series = self._series_of("stream_stream", client_call_details)
        requests = _counted_requests(request_iterator, series)
        return await self._streaming_response(series, continuation, client_call_details, requests)


def _code_of(exc: BaseException) -> grpc.StatusCode:
    """The status a caller sees when ``exc`` ends its call before the call could."""
    if isinstance(exc, aio.AioRpcError):
        code: grpc.StatusCode = exc.code()
        return code
    return _CANCELLED if isinstance(exc, asyncio.CancelledError) else _UNKNOWN


async def _finish_later(series: MethodSeries, call: Any, elapsed: float) -> None:
    """Ends a finished streaming call's series with its code (grpc gives it by coroutine)."""
    try:
        code = await call.code()
    except Exception:  # a call that never started
        code = _UNKNOWN
    series.finish(code, elapsed)


async def _counted_responses(call: Any, series: MethodSeries) -> AsyncIterator[Any]:
    """The call's responses as the caller reads them (``read()`` too: grpc reads through
    what an interceptor returns), counted."""
    async for response in call:
        series.received += 1
        yield response


async def _counted_requests(requests: Any, series: MethodSeries) -> AsyncIterator[Any]:
    """The caller's requests (an iterator of either kind; ``write()`` calls arrive as one
    too), counted as grpc takes them to send."""
    if hasattr(requests, "__aiter__"):
        async for request in requests:
            series.sent += 1
            yield request
        return
    for request in requests:
        series.sent += 1
        yield request
