"""The server's metrics link: the gRPC server metrics and the access log line of each call.

Each call counts as started when the link runs and as handled once, with its final status
(``interceptors.outcome``), when it ends; its duration goes to the handling histogram and,
with the same code, to the access log. Messages of a streamed direction are counted as the
handler reads and yields them; a unary direction counts one message per call, derived from
the call counts when scraped (no work on the call's path). The link sits inside tracing,
so the span is still current when the access line is written and the line carries its
trace id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from json.encoder import encode_basestring_ascii as _text
from typing import Any

import grpc
from grpc import aio
from prometheus_client import REGISTRY, CollectorRegistry

from interceptors.link import Behavior, ServerLink
from interceptors.method import MethodInfo
from interceptors.metrics.access import ACCESS_LOGGER, write_access_line
from interceptors.metrics.collector import MethodSeries, call_stats
from interceptors.outcome import observe
from interceptors.shapes import stream_of

_INFO = logging.INFO
_OK = grpc.StatusCode.OK


class Metrics(ServerLink):
    """gRPC server metrics and the access log; the default registry unless given."""

    needs_request = False  # the request message is not looked at

    def __init__(self, registry: CollectorRegistry | None = None, access_log: bool = True) -> None:
        self.stats = call_stats(registry if registry is not None else REGISTRY, "server")
        self.access_log = access_log
        self.log = logging.getLogger(ACCESS_LOGGER)

    def wrap(self, method: MethodInfo, behavior: Behavior) -> Behavior:
        kind = method.kind
        series = self.stats.series_for(kind, method.service, method.name)
        log = self.log
        access_log = self.access_log
        full_method = method.full_method
        method_text = _text(full_method)
        finish = series.finish
        now = time.perf_counter
        # A client-streaming call's one response counts when the call ends OK.
        response_on_ok = kind == "stream_unary"

        def begin(_context: aio.ServicerContext[Any, Any]) -> float:
            series.started += 1
            return now()

        def end(
            started: float,
            context: aio.ServicerContext[Any, Any],
            code: grpc.StatusCode,
            _exc: BaseException | None,
        ) -> None:
            elapsed = now() - started
            finish(code, elapsed)
            if response_on_ok and code is _OK:
                series.sent += 1
            if access_log and log.isEnabledFor(_INFO):
                write_access_line(log, context, full_method, method_text, code.name, elapsed)

        if kind.startswith("stream_"):
            behavior = _counting_requests(behavior, series)
        if kind.endswith("_stream"):
            behavior = _counting_responses(behavior, series)
        return observe(method, behavior, begin, end)


def _counting_requests(behavior: Behavior, series: MethodSeries) -> Behavior:
    """``behavior`` of a request-streaming method, reading through a counted iterator (a
    handler reading with ``context.read()`` instead is not counted)."""

    async def counted(requests: Any) -> AsyncIterator[Any]:
        async for request in requests:
            series.received += 1
            yield request

    def counting(requests: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        return behavior(requests if requests is None else counted(requests), context)

    return counting


def _counting_responses(behavior: Behavior, series: MethodSeries) -> Behavior:
    """``behavior`` of a response-streaming method, counting what it yields."""

    async def counting(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        async for response in stream_of(behavior(request, context)):
            series.sent += 1
            yield response

    return counting
