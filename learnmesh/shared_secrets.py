"""Secrets every replica of a service must share (a page-token key), kept in its database.

The first replica to need one makes it (random) and every other one reads the same value:
nothing to configure, and a replica added later agrees with the rest. The service's own
migrations make its ``<service>_secrets`` table (``create_secrets_table``).
"""

from __future__ import annotations

import secrets

from sqlalchemy import Column, LargeBinary, MetaData, String, Table, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession

PAGE_TOKENS = "page_tokens"


def secrets_table(name: str, metadata: MetaData) -> Table:
    return Table(
        name,
        metadata,
        Column("name", String(64), primary_key=True),
        Column("value", LargeBinary, nullable=False),
    )


def create_secrets_table(connection: Connection, name: str) -> None:
    """Creates the table ``name`` (in a migration: ``op.get_bind()``)."""
    metadata = MetaData()
    secrets_table(name, metadata)
    metadata.create_all(connection)


async def shared_secret(session: AsyncSession, table: Table, name: str, size: int = 32) -> bytes:
    """The secret ``name``, made by the first caller; every caller gets the same bytes."""
    postgres = session.get_bind().dialect.name == "postgresql"
    insert = pg_insert if postgres else sqlite_insert
    await session.execute(
        insert(table)
        .values(name=name, value=secrets.token_bytes(size))
        .on_conflict_do_nothing(index_elements=["name"])
    )
    value: bytes = (
        await session.execute(select(table.c.value).where(table.c.name == name))
    ).scalar_one()
    return value
