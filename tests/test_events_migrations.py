"""Each service's own migration makes its event tables, on SQLite and PostgreSQL, with the
columns the backbone declares; its downgrade removes them and only them."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import MetaData, inspect
from sqlalchemy.engine import Connection

from learnmesh.db import Database, alembic_config
from learnmesh.eventing.tables import event_tables
from learnmesh.service import definition
from tests.conftest import scratch_database

# The revision before each service's event tables.
BEFORE = {"auth": "0003", "user": "0002"}


def tables_and_columns(connection: Connection) -> dict[str, set[str]]:
    found = inspect(connection)
    return {t: {c["name"] for c in found.get_columns(t)} for t in found.get_table_names()}


def downgrade(connection: Connection, service: str, migrations: Path, revision: str) -> None:
    cfg = alembic_config(service, migrations)
    cfg.attributes["connection"] = connection
    command.downgrade(cfg, revision)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_each_service_migrates_its_event_tables_up_and_down(
    backend: str, tmp_path: Path
) -> None:
    async with scratch_database(backend, tmp_path) as url:
        db = Database(url)
        try:
            for name in BEFORE:
                service = definition(name)
                assert service.migrations is not None and service.event_tables == name
                await db.migrate(name, service.migrations)
            async with db.engine.connect() as conn:
                found = await conn.run_sync(tables_and_columns)
            for name in BEFORE:
                declared = event_tables(name, MetaData())
                for table in (declared.outbox, declared.processed, declared.dead_letters):
                    assert found[table.name] == {c.name for c in table.columns}
            async with db.engine.begin() as conn:
                auth = definition("auth").migrations
                assert auth is not None
                await conn.run_sync(downgrade, "auth", auth, BEFORE["auth"])
            async with db.engine.connect() as conn:
                after = await conn.run_sync(tables_and_columns)
            assert set(found) - set(after) == {
                "auth_outbox",
                "auth_processed_events",
                "auth_dead_letters",
            }
            await db.migrate("auth", auth)  # and up again
            async with db.engine.connect() as conn:
                assert await conn.run_sync(tables_and_columns) == found
        finally:
            await db.dispose()
