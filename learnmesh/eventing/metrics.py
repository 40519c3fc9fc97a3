"""The event backbone's Prometheus metrics (default registry, served on the admin port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

OUTBOX_BACKLOG = Gauge(
    "learnmesh_outbox_backlog_rows", "Outbox rows not yet published to the bus.", ["table"]
)
OUTBOX_OLDEST_AGE = Gauge(
    "learnmesh_outbox_oldest_age_seconds",
    "Age of the oldest outbox row not yet published (0 when none).",
    ["table"],
)
PUBLISHED = Counter(
    "learnmesh_events_published_total", "Events the relay handed to the bus.", ["type"]
)
PUBLISH_FAILURES = Counter(
    "learnmesh_events_publish_failures_total",
    "Relay rounds that stopped because the bus refused a publish.",
    ["table"],
)
CONSUMED = Counter(
    "learnmesh_events_consumed_total",
    "Events a consumer group applied (its handler's transaction committed).",
    ["group", "type"],
)
DUPLICATES = Counter(
    "learnmesh_events_duplicates_total",
    "Deliveries a consumer group skipped because it had processed the event already.",
    ["group", "type"],
)
REDELIVERIES = Counter(
    "learnmesh_events_redeliveries_total",
    "Deliveries handed back to the bus for a later attempt (handler failed).",
    ["group", "type"],
)
DEAD_LETTERS = Counter(
    "learnmesh_events_dead_letters_total",
    "Events a consumer group gave up on and wrote to its dead-letter table.",
    ["group", "type"],
)
CONSUMER_LAG = Gauge(
    "learnmesh_events_consumer_lag",
    "Messages the bus holds for a consumer group that it has not acknowledged yet.",
    ["group"],
)
