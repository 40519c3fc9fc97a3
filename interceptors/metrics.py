"""Metrics and the access log: one histogram sample, one counter increment and one JSON line
per call, each with the call's final status.

The histogram and counter are kept as plain numbers per (method, status code) by the
event-loop thread and turned into Prometheus families only when ``/metrics`` is scraped
(prometheus_client's own instruments take a lock and walk the buckets in Python on every
update, which on a trivial call costs more than everything else here). The access line goes
to the ``learnmesh.access`` logger (formatted like ``learnmesh.kernel.logs.JsonFormatter``);
when that logger is off for INFO nothing of it is built. The link sits inside tracing, so
the span is still current when the line is written and the line carries its trace id.
"""

from __future__ import annotations

import logging
import time
import weakref
from bisect import bisect_left
from collections.abc import Iterator
from json.encoder import encode_basestring_ascii as _text
from typing import Any

import grpc
from grpc import aio
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from interceptors.link import Behavior, ServerLink
from interceptors.method import MethodInfo
from interceptors.outcome import observe
from interceptors.request_id import peer_address
from learnmesh.kernel import principal
from learnmesh.kernel.logs import call_ids, direct_writer, iso_time

ACCESS_LOGGER = "learnmesh.access"
DURATION = "learnmesh_rpc_server_duration_seconds"
CALLS = "learnmesh_rpc_server_calls"  # exposed as learnmesh_rpc_server_calls_total
LABELS = ("service", "method", "code")
# Seconds: a trivial call takes ~0.2 ms here; the default deadline cap is 30 s.
BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_BUCKET_NAMES = (*(floatToGoString(bound) for bound in BUCKETS), "+Inf")

_INFO = logging.INFO


class Series:
    """One method's calls that ended with one code: per-bucket counts and their sum.

    ``counts[i]`` holds calls of at most ``BUCKETS[i]`` seconds that did not fit a smaller
    bucket (the last slot: longer than every bound); Prometheus wants them cumulative,
    which ``CallStats.collect`` computes.
    """

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds


class CallStats(Collector):
    """The latency histogram and call counter, by service, method and final status code.

    Only the event loop's thread adds to a Series; a scrape (another thread) copies each
    count list in one step, and derives the count from those buckets, so a histogram's
    ``_count`` always equals its ``+Inf`` bucket and the counter agrees with both.
    """

    def __init__(self) -> None:
        self.series: dict[tuple[str, str, str], Series] = {}

    def get(self, service: str, method: str, code: grpc.StatusCode) -> Series:
        key = (service, method, code.name)
        found = self.series.get(key)
        if found is None:
            found = self.series[key] = Series()
        return found

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(DURATION, _DURATION_HELP, labels=LABELS)
        yield CounterMetricFamily(CALLS, _CALLS_HELP, labels=LABELS)

    def collect(self) -> Iterator[Metric]:
        duration = HistogramMetricFamily(DURATION, _DURATION_HELP, labels=LABELS)
        calls = CounterMetricFamily(CALLS, _CALLS_HELP, labels=LABELS)
        for labels, series in list(self.series.items()):
            counts, total = list(series.counts), series.total
            cumulative, running = [], 0
            for name, count in zip(_BUCKET_NAMES, counts, strict=True):
                running += count
                cumulative.append((name, running))
            duration.add_metric(labels, cumulative, total)
            calls.add_metric(labels, running)
        yield duration
        yield calls


_DURATION_HELP = "Time the server spent on gRPC calls, by method and final status code."
_CALLS_HELP = "gRPC calls the server finished, by method and final status code."

# One per registry: a second Metrics link on the same registry (several servers in one
# process, tests) shares the collector instead of failing on duplicate names.
_stats: weakref.WeakKeyDictionary[CollectorRegistry, CallStats] = weakref.WeakKeyDictionary()


def call_stats(registry: CollectorRegistry) -> CallStats:
    """The collector registered in ``registry``, made on first use."""
    found = _stats.get(registry)
    if found is None:
        found = _stats[registry] = CallStats()
        registry.register(found)
    return found


class Metrics(ServerLink):
    """Latency histogram, call counter and access log; the default registry unless given."""

    needs_request = False  # the request message is not looked at

    def __init__(self, registry: CollectorRegistry | None = None, access_log: bool = True) -> None:
        self.instruments = call_stats(registry if registry is not None else REGISTRY)
        self.access_log = access_log
        self.log = logging.getLogger(ACCESS_LOGGER)

    def wrap(self, method: MethodInfo, behavior: Behavior) -> Behavior:
        stats = self.instruments
        service, name = method.service, method.name
        # code -> (its Series, its name), filled on first use of each code
        by_code: dict[grpc.StatusCode, tuple[Series, str]] = {}
        log = self.log
        access_log = self.access_log
        method_text = _text(method.full_method)
        now = time.perf_counter

        def begin(_context: aio.ServicerContext[Any, Any]) -> float:
            return now()

        def end(
            started: float,
            context: aio.ServicerContext[Any, Any],
            code: grpc.StatusCode,
            _exc: BaseException | None,
        ) -> None:
            elapsed = now() - started
            found = by_code.get(code)
            if found is None:
                found = by_code[code] = (stats.get(service, name, code), code.name)
            found[0].add(elapsed)
            if access_log and log.isEnabledFor(_INFO):
                _access_line(log, context, method.full_method, method_text, found[1], elapsed)

        return observe(method, behavior, begin, end)


def _access_line(
    log: logging.Logger,
    context: aio.ServicerContext[Any, Any],
    method: str,
    method_text: str,
    status: str,
    elapsed: float,
) -> None:
    """Writes one access line: straight to the JSON writer when it alone listens (the usual
    case: no LogRecord, no handler locks), else as a record the handlers format."""
    info = principal.call_info()
    duration_ms = round(elapsed * 1000, 3)
    request_id, trace_id, span_id = call_ids()
    peer = info.client_address or peer_address(context.peer())
    caller = principal.current_or_none()
    user_id = caller.user_id if caller is not None else None
    writer = direct_writer(log)
    if writer is not None:
        writer.put(
            access_line(
                time.time(),
                method_text,
                status,
                duration_ms,
                request_id,
                trace_id,
                span_id,
                peer,
                info.peer_identity,
                user_id,
            )
        )
        return
    # The ids ride on the record itself, so any handler (even one formatting on another
    # thread, away from this call's context) writes them.
    fields: dict[str, Any] = {
        "request_id": request_id,
        "trace_id": trace_id,
        "span_id": span_id,
        "peer": peer,
        "method": method,
        "status": status,
        "duration_ms": duration_ms,
    }
    if info.peer_identity:
        fields["peer_identity"] = info.peer_identity
    if user_id is not None:
        fields["user_id"] = user_id
    message = f"{method} {status} {duration_ms} ms"
    log.handle(log.makeRecord(log.name, _INFO, "", 0, message, (), None, extra=fields))


def access_line(
    created: float,
    method_text: str,
    status: str,
    duration_ms: float,
    request_id: str,
    trace_id: str,
    span_id: str,
    peer: str,
    peer_identity: str,
    user_id: str | None,
) -> str:
    """The access line ``json_line`` writes for these fields, built in one go (``method_text``
    is the method already JSON-encoded; trace and span ids are hex, status a code name)."""
    ms = repr(duration_ms)  # what json writes for a finite float, made once for two places
    ids = f', "trace_id": "{trace_id}", "span_id": "{span_id}"' if trace_id else ""
    request = f', "request_id": {_text(request_id)}' if request_id else ""
    tail = f', "peer_identity": {_text(peer_identity)}' if peer_identity else ""
    if user_id is not None:
        tail += f', "user_id": {_text(user_id)}'
    return (
        f'{{"time": "{iso_time(created)}", "level": "INFO", "logger": "{ACCESS_LOGGER}", '
        f'"message": {method_text[:-1]} {status} {ms} ms"{request}{ids}, '
        f'"peer": {_text(peer)}, "method": {method_text}, "status": "{status}", '
        f'"duration_ms": {ms}{tail}}}\n'
    )
