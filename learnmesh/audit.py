"""The append-only audit trail of security events.

Each service that records security events owns an audit table built by ``audit_table``
(same columns everywhere) and makes it append-only in its migration with
``append_only_ddl``: the database itself refuses UPDATE and DELETE on it.

Services record the events of their rules with ``record``, in the transaction of the change.
Calls the server chain refuses (bad tokens, denied users and certificates) reach the trail
through ``RefusalTrail``, off the call path.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter
from sqlalchemy import Column, MetaData, String, Table, Text, insert
from sqlalchemy.ext.asyncio import AsyncSession

from learnmesh.db import UtcDateTime, utcnow
from learnmesh.kernel import principal
from learnmesh.kernel.principal import CallInfo
from learnmesh.kernel.refusals import Refusal

if TYPE_CHECKING:
    from learnmesh.db import Database

log = logging.getLogger("learnmesh.audit")

CLOSE_TIMEOUT = 5.0  # seconds a stop waits for the last refusal rows

REFUSALS_DROPPED = Counter(
    "learnmesh_audit_refusals_dropped",
    "Refused calls the audit trail did not store: no room in the window, or the write failed",
    ["event"],
)


def audit_table(name: str, metadata: MetaData) -> Table:
    return Table(
        name,
        metadata,
        Column("id", String(36), primary_key=True),
        Column("at", UtcDateTime, nullable=False, index=True),
        # For example "login.failed", "mfa.enabled", "refresh_token.reused", "role.changed".
        Column("event", String(64), nullable=False, index=True),
        # The user the event is about (may be empty for an unknown email).
        Column("subject", String(64), nullable=False, index=True),
        # The user who caused it, when not the subject (an admin changing a role).
        Column("actor", String(64), nullable=False, default=""),
        Column("client_address", String(64), nullable=False, default=""),
        # The caller's request id (x-request-id) when it sent one, else the server's call id.
        Column("request_id", String(128), nullable=False, default=""),
        # The id the server made for the call: unique, whatever the caller sent.
        Column("call_id", String(64), nullable=False, default="", server_default=""),
        # Extra facts as JSON; never secrets, passwords or tokens.
        Column("details", Text, nullable=False, default="{}"),
    )


def append_only_ddl(table: str, dialect: str) -> list[str]:
    """Statements that make ``table`` refuse UPDATE and DELETE."""
    if dialect == "postgresql":
        return [
            f"""CREATE FUNCTION {table}_append_only() RETURNS trigger AS $$
            BEGIN RAISE EXCEPTION '{table} is append-only'; END; $$ LANGUAGE plpgsql""",
            f"""CREATE TRIGGER {table}_no_update BEFORE UPDATE OR DELETE ON {table}
            FOR EACH ROW EXECUTE FUNCTION {table}_append_only()""",
        ]
    return [
        f"""CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table}
        BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END""",
        f"""CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table}
        BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END""",
    ]


async def record(
    session: AsyncSession,
    table: Table,
    event: str,
    subject: str,
    *,
    actor: str = "",
    **details: Any,
) -> None:
    """Adds one event, with the current call's address, the caller's request id and the
    server's call id, in ``session``'s transaction (so it commits or rolls back with the
    change it describes)."""
    row = _row(principal.call_info(), utcnow(), event, subject, actor, details)
    await session.execute(insert(table).values(**row))


def _row(
    call: CallInfo, at: datetime, event: str, subject: str, actor: str, details: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "at": at,
        "event": event,
        "subject": subject,
        "actor": actor,
        "client_address": call.client_address[:64],
        "request_id": call.request_id,
        "call_id": call.call_id,
        "details": json.dumps(details, sort_keys=True, default=str),
    }


@dataclass
class _Repeats:
    """The first of a window's like refusals, and how many there were."""

    first: Refusal
    at: datetime
    count: int = 1
    last: float = field(default_factory=time.time)


class RefusalTrail:
    """Stores the server chain's refusals in the audit table of the service that owns the
    refused method (the links' ``on_refusal`` hook is ``record``), without ever costing
    the refused call a database write.

    ``record`` only counts the refusal in memory; every ``window`` seconds a task of its
    own writes what was counted, one row per refusal alike in table, event, address,
    reason, method, user and certificate, carrying the first call's request and call ids
    and ``count`` / ``last_at`` in its details. So a flood of forged tokens from one
    address is a row per window. At most ``capacity`` such rows wait at a time: a refusal
    finding no room, or a window whose write failed (it is not retried: an unreachable
    database must not grow memory), is counted in ``learnmesh_audit_refusals_dropped_total``
    and in a warning once per window. Refusals of methods whose service keeps no audit
    table are logged the same way instead. Refusals still waiting when the process is
    killed are lost; ``aclose`` writes them on an orderly stop.
    """

    def __init__(
        self,
        db: Database,
        tables: Mapping[str, Table],
        *,
        window: float = 5.0,
        capacity: int = 1000,
    ) -> None:
        self.db = db
        self.tables = dict(tables)  # by full service name
        self.window = window
        self.capacity = capacity
        self._pending: dict[tuple[str, ...], _Repeats] = {}
        self._dropped: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()

    def record(self, refusal: Refusal) -> None:
        """Counts ``refusal`` for the next write; returns at once and never raises."""
        try:
            call = refusal.call
            key = (
                refusal.event,
                refusal.method,
                refusal.reason,
                call.client_address,
                refusal.subject,
                call.peer_identity,
            )
            found = self._pending.get(key)
            if found is not None:
                found.count += 1
                found.last = time.time()
            elif len(self._pending) < self.capacity:
                self._pending[key] = _Repeats(refusal, utcnow())
            else:
                self._dropped[refusal.event] = self._dropped.get(refusal.event, 0) + 1
        except Exception:  # the refusal the caller gets must not change
            log.exception("could not count a refusal for the audit trail")

    def start(self) -> None:
        """Starts the writing task (in the running loop, outside any call's context)."""
        if self._task is None:
            self._task = asyncio.create_task(
                self._write_every_window(), name="refusal-audit", context=contextvars.Context()
            )

    async def aclose(self) -> None:
        """Writes what is still waiting and stops (giving up after ``CLOSE_TIMEOUT``
        seconds, so an unreachable database cannot hold up a stop)."""
        self._closing.set()
        task, self._task = self._task, None
        try:
            await asyncio.wait_for(task if task is not None else self.flush(), CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("gave up writing the last refused calls to the audit trail")

    async def _write_every_window(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.window)
            try:
                await self.flush()
            except Exception:  # the next window still gets written
                log.exception("could not write refused calls to the audit trail")
            if self._closing.is_set():
                return

    async def flush(self) -> None:
        """Writes the refusals counted so far (one transaction per table)."""
        pending, self._pending = self._pending, {}
        dropped, self._dropped = self._dropped, {}
        by_table: dict[Table, list[_Repeats]] = {}
        for repeats in pending.values():
            service = repeats.first.method.lstrip("/").partition("/")[0]
            table = self.tables.get(service)
            if table is None:
                log.warning(
                    "refused call of a service with no audit table: %s",
                    json.dumps(self._details(repeats), sort_keys=True),
                )
                continue
            by_table.setdefault(table, []).append(repeats)
        for table, group in by_table.items():
            rows = [
                _row(r.first.call, r.at, r.first.event, r.first.subject, "", self._details(r))
                for r in group
            ]
            try:
                async with self.db.transaction() as session:
                    await session.execute(insert(table), rows)
            except Exception:
                log.exception("could not write %d refusal rows to %s", len(rows), table.name)
                for r in group:
                    dropped[r.first.event] = dropped.get(r.first.event, 0) + r.count
        for event, count in dropped.items():
            REFUSALS_DROPPED.labels(event).inc(count)
        if dropped:
            log.warning("audit trail dropped refused calls: %s", json.dumps(dropped))

    @staticmethod
    def _details(repeats: _Repeats) -> dict[str, Any]:
        refusal = repeats.first
        details: dict[str, Any] = {
            "method": refusal.method,
            "reason": refusal.reason,
            "count": repeats.count,
            "last_at": datetime.fromtimestamp(repeats.last, UTC).isoformat(),
        }
        if refusal.required:
            details["required"] = refusal.required
        if refusal.call.peer_identity:
            details["caller"] = refusal.call.peer_identity
        return details
