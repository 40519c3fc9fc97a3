"""The gRPC metrics, named and labelled as go-grpc-middleware's Prometheus provider names
them, kept as plain numbers and turned into Prometheus families only when scraped.

One ``MethodSeries`` per (side, RPC type, service, method) holds the started count, the
message counts, the latency histogram and a count per final code; ``CallStats`` exposes
them as ``grpc_<side>_started_total``, ``grpc_<side>_handled_total`` (with ``grpc_code``),
``grpc_<side>_msg_received_total``, ``grpc_<side>_msg_sent_total`` and
``grpc_<side>_handling_seconds``. prometheus_client's own instruments take a lock and walk
the buckets in Python on every update, which on a trivial call costs more than everything
else in the chain; tests/test_metrics.py checks that the text exposed here stays what those
instruments would expose for the same observations.
"""

from __future__ import annotations

import weakref
from bisect import bisect_left
from collections.abc import Iterator
from typing import Literal

import grpc
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from interceptors.method import RpcKind

Side = Literal["server", "client"]
LABELS = ("grpc_type", "grpc_service", "grpc_method")
LABELS_WITH_CODE = (*LABELS, "grpc_code")
# The grpc_type label of each kind of RPC.
GRPC_TYPES: dict[RpcKind, str] = {
    "unary_unary": "unary",
    "stream_unary": "client_stream",
    "unary_stream": "server_stream",
    "stream_stream": "bidi_stream",
}
# The grpc_code label: Go's names of the codes (codes.Code.String()).
CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}
# Seconds. Prometheus' default buckets (5 ms to 10 s) and finer ones below them (a trivial
# call takes well under a millisecond), and the default deadline cap (30 s) on top.
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

# Where a message count comes from for one kind and side: "counted" by the link as messages
# pass, or taken from the call counts, as go-grpc-middleware counts the single message of a
# unary direction: "started" (one per call begun) or "handled" (one per call ended,
# whatever its code). A unary response of a client-streaming call is "counted" on OK.
Source = Literal["counted", "started", "handled"]
_SOURCES: dict[tuple[Side, RpcKind], tuple[Source, Source]] = {  # (received, sent)
    ("server", "unary_unary"): ("started", "handled"),
    ("server", "unary_stream"): ("started", "counted"),
    ("server", "stream_unary"): ("counted", "counted"),
    ("server", "stream_stream"): ("counted", "counted"),
    ("client", "unary_unary"): ("handled", "started"),
    ("client", "unary_stream"): ("counted", "started"),
    ("client", "stream_unary"): ("counted", "counted"),
    ("client", "stream_stream"): ("counted", "counted"),
}


_Families = tuple[
    CounterMetricFamily,
    CounterMetricFamily,
    CounterMetricFamily,
    CounterMetricFamily,
    HistogramMetricFamily,
]


class MethodSeries:
    """One method's numbers on one side. Links add to ``started``, ``received`` and
    ``sent`` directly and end each call with ``finish``; only the event loop's thread
    writes, a scrape (another thread) copies."""

    __slots__ = (
        "by_code",
        "counts",
        "labels",
        "received",
        "received_from",
        "sent",
        "sent_from",
        "started",
        "stats",
        "total",
    )

    def __init__(self, stats: CallStats, labels: tuple[str, str, str], kind: RpcKind) -> None:
        self.stats = stats
        self.labels = labels
        self.received_from, self.sent_from = _SOURCES[stats.side, kind]
        self.started = 0
        self.received = 0
        self.sent = 0
        # counts[i]: calls of at most BUCKETS[i] seconds that fit no smaller bucket (the last
        # slot: longer than every bound); cumulated when scraped.
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        # code -> [calls that ended with it], shared with the collector's handled table
        self.by_code: dict[grpc.StatusCode, list[int]] = {}

    def finish(self, code: grpc.StatusCode, seconds: float) -> None:
        """One call ended with ``code`` after ``seconds``."""
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        cell = self.by_code.get(code)
        if cell is None:
            cell = self.by_code[code] = self.stats.handled_cell(self.labels, code)
        cell[0] += 1


class CallStats(Collector):
    """Every method's series of one side (server or client), as Prometheus families.

    Series appear in the order they were first used, as prometheus_client's labelled
    instruments list them; a series with nothing counted yet is left out, as theirs are
    until first incremented.
    """

    def __init__(self, side: Side) -> None:
        self.side: Side = side
        self.series: dict[tuple[str, str, str], MethodSeries] = {}
        self.handled: dict[tuple[str, str, str, str], list[int]] = {}
        prefix = f"grpc_{side}"
        self.names = (
            f"{prefix}_started",
            f"{prefix}_handled",
            f"{prefix}_msg_received",
            f"{prefix}_msg_sent",
            f"{prefix}_handling_seconds",
        )
        self.helps = _HELP[side]

    def series_for(self, kind: RpcKind, service: str, method: str) -> MethodSeries:
        """The series of one method (made on first use)."""
        labels = (GRPC_TYPES[kind], service, method)
        found = self.series.get(labels)
        if found is None:
            found = self.series[labels] = MethodSeries(self, labels, kind)
        return found

    def handled_cell(self, labels: tuple[str, str, str], code: grpc.StatusCode) -> list[int]:
        key = (*labels, CODE_NAMES.get(code, "Unknown"))
        found = self.handled.get(key)
        if found is None:
            found = self.handled[key] = [0]
        return found

    def _families(self) -> _Families:
        started, handled, received, sent, seconds = self.names
        help_started, help_handled, help_received, help_sent, help_seconds = self.helps
        return (
            CounterMetricFamily(started, help_started, labels=LABELS),
            CounterMetricFamily(handled, help_handled, labels=LABELS_WITH_CODE),
            CounterMetricFamily(received, help_received, labels=LABELS),
            CounterMetricFamily(sent, help_sent, labels=LABELS),
            HistogramMetricFamily(seconds, help_seconds, labels=LABELS),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        started, handled, received, sent, seconds = families
        for series in list(self.series.values()):
            labels, begun = series.labels, series.started
            counts, total = list(series.counts), series.total
            cumulative, ended = [], 0
            for name, count in zip(_BUCKET_NAMES, counts, strict=True):
                ended += count
                cumulative.append((name, ended))
            if begun:
                started.add_metric(labels, begun)
            for family, source, counted in (
                (received, series.received_from, series.received),
                (sent, series.sent_from, series.sent),
            ):
                value = begun if source == "started" else ended if source == "handled" else counted
                if value:
                    family.add_metric(labels, value)
            if ended:
                seconds.add_metric(labels, cumulative, total)
        for key, cell in list(self.handled.items()):
            handled.add_metric(key, cell[0])
        yield from families


_WHERE: tuple[tuple[Side, str], ...] = (("server", "by the server"), ("client", "by this client"))
_HELP: dict[Side, tuple[str, str, str, str, str]] = {
    side: (
        f"gRPC calls started {where}.",
        f"gRPC calls finished {where}, by final status code.",
        f"gRPC messages received {where}.",
        f"gRPC messages sent {where}.",
        f"Time from start to final status of gRPC calls {where}, in seconds.",
    )
    for side, where in _WHERE
}

# One per registry and side: several links on one registry (several servers or client
# factories in one process, tests) share the collector instead of failing on duplicate
# names.
_stats: weakref.WeakKeyDictionary[CollectorRegistry, dict[Side, CallStats]] = (
    weakref.WeakKeyDictionary()
)


def call_stats(registry: CollectorRegistry, side: Side) -> CallStats:
    """The collector of ``side`` registered in ``registry``, made on first use."""
    sides = _stats.setdefault(registry, {})
    found = sides.get(side)
    if found is None:
        found = sides[side] = CallStats(side)
        registry.register(found)
    return found
