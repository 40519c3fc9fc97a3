"""The bus, relay and consumers a process builds from its Settings."""

from __future__ import annotations

from sqlalchemy import Table

from learnmesh.config import ConfigError, Settings
from learnmesh.db import Database
from learnmesh.eventing.bus import Bus
from learnmesh.eventing.consumer import Consumer
from learnmesh.eventing.handlers import Handlers
from learnmesh.eventing.jetstream import JetStreamBus
from learnmesh.eventing.memory import InProcessBus
from learnmesh.eventing.relay import Relay
from learnmesh.eventing.tables import EventTables


def make_bus(settings: Settings) -> Bus:
    """The in-process bus, or JetStream when ``bus_url`` is set (not started yet)."""
    events = settings.events
    if events.duplicate_window <= events.relay_retry_max:
        raise ConfigError(
            "events.duplicate_window must be longer than events.relay_retry_max "
            f"({events.duplicate_window} <= {events.relay_retry_max}): a relay retrying a "
            "publish after the window would publish duplicates the bus no longer drops"
        )
    if not settings.bus_url:
        return InProcessBus(duplicate_window=events.duplicate_window)
    return JetStreamBus(
        settings.bus_url,
        duplicate_window=events.duplicate_window,
        max_age=events.stream_max_age,
        replicas=events.stream_replicas,
    )


def make_relay(settings: Settings, db: Database, outbox: Table, bus: Bus) -> Relay:
    events = settings.events
    return Relay(
        db,
        outbox,
        bus,
        poll_interval=events.relay_poll_interval,
        retention=events.outbox_retention,
        retry_max=events.relay_retry_max,
    )


def make_consumer(
    settings: Settings, db: Database, tables: EventTables, bus: Bus, handlers: Handlers
) -> Consumer:
    events = settings.events
    return Consumer(
        db,
        tables,
        bus,
        handlers,
        max_deliveries=events.max_deliveries,
        backoff_base=events.backoff_base,
        backoff_max=events.backoff_max,
    )
