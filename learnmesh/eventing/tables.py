"""The tables a service keeps for its events: its outbox, and as a consumer the ids it has
processed and the events it gave up on.

Each service owns ``<service>_outbox``, ``<service>_processed_events`` and
``<service>_dead_letters`` (same columns everywhere) and creates them in its own Alembic
migration with ``create_event_tables``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
)
from sqlalchemy.engine import Connection

from learnmesh.db import UtcDateTime

# An Event's id is a UUID; a consumer group is "<service>.<handler group>".
ID_LENGTH = 36
NAME_LENGTH = 128
# The dead-letter table keeps this much of the last error.
ERROR_LENGTH = 500


def outbox_table(name: str, metadata: MetaData) -> Table:
    """Events written in the transaction of the change they describe, until relayed.

    ``seq`` orders them: SQLite's AUTOINCREMENT never reuses the number of a deleted row,
    and PostgreSQL's identity never goes back, so a newer row always has a larger ``seq``.
    """
    return Table(
        name,
        metadata,
        Column(
            "seq",
            BigInteger().with_variant(Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        Column("id", String(ID_LENGTH), nullable=False, unique=True),
        Column("type", String(NAME_LENGTH), nullable=False),
        Column("subject", String(NAME_LENGTH), nullable=False),
        Column("created_at", UtcDateTime, nullable=False),
        # The serialized learnmesh.events.v1.Event, exactly as published.
        Column("payload", LargeBinary, nullable=False),
        # Set once the bus has accepted it; such rows go after the retention period.
        Column("published_at", UtcDateTime, nullable=True),
        Index(f"ix_{name}_published_at", "published_at"),
        sqlite_autoincrement=True,
    )


def processed_events_table(name: str, metadata: MetaData) -> Table:
    """The events each consumer group has applied, committed with the handler's effect:
    a redelivered or duplicated event finds its row and changes nothing."""
    return Table(
        name,
        metadata,
        Column("consumer_group", String(NAME_LENGTH), primary_key=True),
        Column("event_id", String(ID_LENGTH), primary_key=True),
        Column("processed_at", UtcDateTime, nullable=False),
    )


def dead_letters_table(name: str, metadata: MetaData) -> Table:
    """Events a consumer group failed on too many times, with the last error."""
    return Table(
        name,
        metadata,
        Column("consumer_group", String(NAME_LENGTH), primary_key=True),
        Column("event_id", String(ID_LENGTH), primary_key=True),
        Column("type", String(NAME_LENGTH), nullable=False),
        Column("subject", String(NAME_LENGTH), nullable=False),
        Column("payload", LargeBinary, nullable=False),
        Column("error", String(ERROR_LENGTH), nullable=False),
        # How many times its handler failed.
        Column("attempts", Integer, nullable=False),
        Column("failed_at", UtcDateTime, nullable=False),
    )


@dataclass(frozen=True)
class EventTables:
    """One service's three event tables."""

    outbox: Table
    processed: Table
    dead_letters: Table


def event_tables(service: str, metadata: MetaData) -> EventTables:
    return EventTables(
        outbox=outbox_table(f"{service}_outbox", metadata),
        processed=processed_events_table(f"{service}_processed_events", metadata),
        dead_letters=dead_letters_table(f"{service}_dead_letters", metadata),
    )


def create_event_tables(connection: Connection, service: str) -> None:
    """Creates ``service``'s event tables (in a migration: ``op.get_bind()``)."""
    metadata = MetaData()
    event_tables(service, metadata)
    metadata.create_all(connection)


def drop_event_tables(connection: Connection, service: str) -> None:
    metadata = MetaData()
    event_tables(service, metadata)
    metadata.drop_all(connection)
