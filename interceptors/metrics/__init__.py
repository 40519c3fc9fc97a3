"""gRPC metrics in go-grpc-middleware's names, and the access log (docs/metrics.md).

``collector``: the series and their Prometheus exposition; ``server``: the server link
(metrics and access log); ``client``: the client link; ``access``: the access log line.
"""

from interceptors.metrics.access import ACCESS_LOGGER, access_line
from interceptors.metrics.client import ClientMetrics
from interceptors.metrics.collector import BUCKETS, CODE_NAMES, GRPC_TYPES, call_stats
from interceptors.metrics.server import Metrics

__all__ = [
    "ACCESS_LOGGER",
    "BUCKETS",
    "CODE_NAMES",
    "GRPC_TYPES",
    "ClientMetrics",
    "Metrics",
    "access_line",
    "call_stats",
]
