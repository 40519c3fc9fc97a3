"""Events a consumer group gave up on: recorded with the last error, listed, replayed."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, delete, insert, select

from learnmesh.db import Database, utcnow
from learnmesh.eventing.bus import Bus
from learnmesh.eventing.tables import ERROR_LENGTH, EventTables
from learnmesh.events.v1 import events_pb2

# Kept of an error's first line; credentials in URLs are masked.
ERROR_SHOWN = 200
_URL_CREDENTIALS = re.compile(r"(\w+://)[^/@\s]+@")


def describe_error(exc: BaseException) -> str:
    """A short description of ``exc`` for the table: its type and the first line of its
    message (SQLAlchemy puts the statement and its parameters on the lines after), with
    URL credentials masked."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return _URL_CREDENTIALS.sub(r"\1***@", text)[: min(ERROR_SHOWN, ERROR_LENGTH)]


async def record(
    db: Database,
    tables: EventTables,
    group: str,
    event: events_pb2.Event,
    payload: bytes,
    attempts: int,
    error: str,
) -> None:
    """Writes (or replaces) the group's dead letter for ``event``."""
    table = tables.dead_letters
    async with db.write_transaction() as session:
        await session.execute(
            delete(table).where(table.c.consumer_group == group, table.c.event_id == event.id)
        )
        await session.execute(
            insert(table).values(
                consumer_group=group,
                event_id=event.id,
                type=event.type,
                subject=event.subject,
                payload=payload,
                error=error,
                attempts=attempts,
                failed_at=utcnow(),
            )
        )


async def listing(db: Database, tables: EventTables) -> Sequence[Row[Any]]:
    """Every dead letter, oldest first."""
    table = tables.dead_letters
    async with db.transaction() as session:
        query = select(table).order_by(table.c.failed_at, table.c.event_id)
        return (await session.execute(query)).all()


async def replay(db: Database, tables: EventTables, bus: Bus, event_id: str) -> int:
    """Publishes the dead event ``event_id`` again and removes its dead letters; returns
    how many there were (0: unknown id).

    The event keeps its id, so groups that applied it skip it; the bus message gets an id of
    its own, or the bus's duplicate window would drop it as the original's duplicate.
    """
    table = tables.dead_letters
    async with db.write_transaction() as session:
        # Removed in the transaction that publishes: a failed publish keeps them, and a new
        # failure of the replayed event writes its dead letter only after this commits.
        rows = (
            await session.execute(
                delete(table).where(table.c.event_id == event_id).returning(table)
            )
        ).all()
        if not rows:
            return 0
        row = rows[0]
        msg_id = f"{event_id}.replay.{uuid.uuid4().hex}"
        await bus.publish(bus.subject_for(row.type), row.payload, msg_id, row.subject)
    return len(rows)
