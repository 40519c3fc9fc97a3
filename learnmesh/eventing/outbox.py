"""Emitting an event: one row in the service's outbox, in the caller's transaction.

The row commits or rolls back with the change it describes, so a rolled-back change leaves
no event. After the commit, relays of the same process are woken at once (a Session
``after_commit`` hook: a rollback wakes nobody); on PostgreSQL the transaction also NOTIFYs
the table's channel, which PostgreSQL delivers only on commit, so relays in other
processes wake too.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections import defaultdict
from datetime import datetime

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message
from opentelemetry import trace
from sqlalchemy import LargeBinary, Table, TextClause, bindparam, event, insert, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from learnmesh.db import utcnow
from learnmesh.events.v1 import events_pb2
from learnmesh.kernel import tracecontext

# session.info key: the outbox tables written in the session's current transaction.
_WRITTEN = "learnmesh.eventing.outbox_written"
# Relays of this process waiting on each outbox table, by table name.
_waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)


def notify_channel(table: str) -> str:
    """The PostgreSQL channel a commit to ``table`` notifies."""
    return f"learnmesh_outbox_{table}"


def wake_on_commit(table: str) -> asyncio.Event:
    """An event set after every commit of this process that wrote to ``table``."""
    waiter = asyncio.Event()
    _waiters[table].add(waiter)
    return waiter


def stop_waking(table: str, waiter: asyncio.Event) -> None:
    _waiters[table].discard(waiter)


@event.listens_for(Session, "after_commit")
def _wake_relays(session: Session) -> None:
    for table in session.info.pop(_WRITTEN, ()):
        for waiter in _waiters.get(table, ()):
            waiter.set()


@event.listens_for(Session, "after_rollback")
def _forget_written(session: Session) -> None:
    session.info.pop(_WRITTEN, None)


def current_traceparent() -> str:
    """The W3C traceparent of the current span, or "" outside a trace."""
    span_context = trace.get_current_span(tracecontext.current_context()).get_span_context()
    if not span_context.is_valid:
        return ""
    flags = int(span_context.trace_flags)
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{flags:02x}"


def build_event(
    source: str, event_type: str, subject: str, data: Message, at: datetime
) -> events_pb2.Event:
    packed = any_pb2.Any()
    packed.Pack(data)
    time = timestamp_pb2.Timestamp()
    time.FromDatetime(at)
    return events_pb2.Event(
        id=str(uuid.uuid4()),
        type=event_type,
        source=source,
        subject=subject,
        time=time,
        data=packed,
        trace_parent=current_traceparent(),
    )


async def emit(
    session: AsyncSession,
    table: Table,
    event_type: str,
    subject: str,
    data: Message,
    *,
    source: str = "",
) -> events_pb2.Event:
    """Writes an event about ``subject`` to ``table`` in ``session``'s transaction.

    Call it after the change the event describes. On PostgreSQL the transaction first takes
    a lock on (table, subject), held until it ends: two transactions emitting about one
    subject take their ``seq`` numbers in commit order, which the relay's per-subject order
    relies on (sequence numbers are otherwise handed out at insert time, not at commit).
    ``source`` defaults to the table's service (the name before ``_outbox``).
    """
    now = utcnow()
    service = table.name.removesuffix("_outbox")
    built = build_event(source or service, event_type, subject, data, now)
    row = {
        "id": built.id,
        "type": event_type,
        "subject": subject,
        "created_at": now,
        "payload": built.SerializeToString(),
    }
    written: set[str] = session.sync_session.info.setdefault(_WRITTEN, set())
    first = table.name not in written
    written.add(table.name)
    if session.get_bind().dialect.name == "postgresql":
        # The lock, the row and (once per transaction) the NOTIFY in one round trip.
        statement = _postgres_emit(table, notify=first)
        await session.execute(
            statement,
            {**row, "key": f"{table.name}:{subject}", "channel": notify_channel(table.name)},
        )
    else:
        await session.execute(insert(table).values(row))
    return built


@functools.cache
def _postgres_emit(table: Table, *, notify: bool) -> TextClause:
    """INSERT … SELECT from the lock: the row (and its ``seq``) is made after the lock is
    held, as the source row of the insert cannot exist before its CTE ran."""
    name = table.name
    notifying = ", note AS (SELECT pg_notify(:channel, '')) " if notify else " "
    source = "FROM held, note" if notify else "FROM held"
    return text(
        f"WITH held AS (SELECT pg_advisory_xact_lock(hashtext(:key))){notifying}"
        f'INSERT INTO "{name}" (id, type, subject, created_at, payload) '
        "SELECT CAST(:id AS VARCHAR), CAST(:type AS VARCHAR), CAST(:subject AS VARCHAR), "
        f"CAST(:created_at AS TIMESTAMPTZ), CAST(:payload AS BYTEA) {source}"
    ).bindparams(
        bindparam("created_at", type_=table.c.created_at.type),
        bindparam("payload", type_=LargeBinary),
    )
