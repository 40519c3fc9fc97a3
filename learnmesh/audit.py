"""The append-only audit trail of security events.

Each service that records security events owns an audit table built by ``audit_table``
(same columns everywhere) and makes it append-only in its migration with
``append_only_ddl``: the database itself refuses UPDATE and DELETE on it.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import Column, MetaData, String, Table, Text, insert
from sqlalchemy.ext.asyncio import AsyncSession

from learnmesh.db import UtcDateTime, utcnow
from learnmesh.kernel import principal


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
    call = principal.call_info()
    await session.execute(
        insert(table).values(
            id=str(uuid.uuid4()),
            at=utcnow(),
            event=event,
            subject=subject,
            actor=actor,
            client_address=call.client_address,
            request_id=call.request_id,
            call_id=call.call_id,
            details=json.dumps(details, sort_keys=True, default=str),
        )
    )
