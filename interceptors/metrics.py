"""Metrics and the access log: one histogram sample, one counter increment and one JSON line
per call, each with the call's final status.

Prometheus label children are cached per method and status code, so a call costs one dict
lookup before ``observe``/``inc``. The access line goes to the ``learnmesh.access`` logger
(formatted by ``learnmesh.telemetry.JsonFormatter``); when that logger is off for INFO
nothing of it is built. The link sits inside tracing, so the span is still current when the
line is written and the line carries its trace id.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from interceptors.chain import Behavior, ServerLink
from interceptors.method import MethodInfo
from interceptors.outcome import observe
from interceptors.request_id import peer_address
from learnmesh import principal
from learnmesh.telemetry import call_ids, direct_writer, json_line

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

_INFO = logging.INFO


@dataclass(frozen=True)
class Instruments:
    duration: Histogram
    calls: Counter


# One set per registry: a second Metrics link on the same registry (several servers in one
# process, tests) shares the collectors instead of failing on duplicate names.
_instruments: weakref.WeakKeyDictionary[CollectorRegistry, Instruments] = (
    weakref.WeakKeyDictionary()
)


def instruments(registry: CollectorRegistry) -> Instruments:
    """The histogram and counter registered in ``registry``, made on first use."""
    found = _instruments.get(registry)
    if found is not None:
        return found
    made = Instruments(
        duration=Histogram(
            DURATION,
            "Time the server spent on gRPC calls, by method and final status code.",
            LABELS,
            buckets=BUCKETS,
            registry=registry,
        ),
        calls=Counter(
            CALLS,
            "gRPC calls the server finished, by method and final status code.",
            LABELS,
            registry=registry,
        ),
    )
    _instruments[registry] = made
    return made


class Metrics(ServerLink):
    """Latency histogram, call counter and access log; the default registry unless given."""

    def __init__(self, registry: CollectorRegistry | None = None, access_log: bool = True) -> None:
        self.instruments = instruments(registry if registry is not None else REGISTRY)
        self.access_log = access_log
        self.log = logging.getLogger(ACCESS_LOGGER)

    def wrap(self, method: MethodInfo, behavior: Behavior) -> Behavior:
        duration, calls = self.instruments.duration, self.instruments.calls
        service, name, full_method = method.service, method.name, method.full_method
        # code -> (histogram child, counter child), filled on first use of each code
        children: dict[grpc.StatusCode, tuple[Any, Any]] = {}
        log = self.log
        access_log = self.access_log
        now = time.perf_counter

        def begin(_context: aio.ServicerContext) -> float:
            return now()

        def end(
            started: float,
            context: aio.ServicerContext,
            code: grpc.StatusCode,
            _exc: BaseException | None,
        ) -> None:
            elapsed = now() - started
            pair = children.get(code)
            if pair is None:
                labels = (service, name, code.name)
                pair = children[code] = (duration.labels(*labels), calls.labels(*labels))
            pair[0].observe(elapsed)
            pair[1].inc()
            if access_log and log.isEnabledFor(_INFO):
                _access_line(log, context, full_method, code, elapsed)

        return observe(method, behavior, begin, end)


def _access_line(
    log: logging.Logger,
    context: aio.ServicerContext,
    method: str,
    code: grpc.StatusCode,
    elapsed: float,
) -> None:
    """Writes one access line; the record is made directly (no caller lookup, no %-args)."""
    info = principal.call_info()
    duration_ms = round(elapsed * 1000, 3)
    # The ids ride on the record itself, so any handler (even one formatting on another
    # thread, away from this call's context) writes them.
    request_id, trace_id, span_id = call_ids()
    fields: dict[str, Any] = {
        "request_id": request_id,
        "trace_id": trace_id,
        "span_id": span_id,
        "peer": info.client_address or peer_address(context.peer()),
        "method": method,
        "status": code.name,
        "duration_ms": duration_ms,
    }
    if info.peer_identity:
        fields["peer_identity"] = info.peer_identity
    caller = principal.current_or_none()
    if caller is not None:
        fields["user_id"] = caller.user_id
    message = f"{method} {code.name} {duration_ms} ms"
    writer = direct_writer(log)
    if writer is not None:  # the usual case: skip LogRecord, handler locks, dict filtering
        writer.put(json_line(time.time(), log.name, message, fields))
        return
    record = log.makeRecord(log.name, _INFO, "", 0, message, (), None, extra=fields)
    log.handle(record)
