"""`learnmesh events dead-letters` and `learnmesh events replay ID`."""

from __future__ import annotations

import asyncio

from sqlalchemy import MetaData

from learnmesh import cli
from learnmesh.db import Database
from learnmesh.eventing import dead_letters
from learnmesh.eventing.tables import create_event_tables, event_tables
from learnmesh.events.v1 import events_pb2


def dead_letter_in_user_tables(url: str) -> events_pb2.Event:
    event = events_pb2.Event(id="0b8f3c1e-1111-4222-8333-944455556666", type="user.deleted")
    event.subject = "u-1"

    async def write() -> None:
        db = Database(url)
        async with db.engine.begin() as conn:
            await conn.run_sync(create_event_tables, "user")
        tables = event_tables("user", MetaData())
        await dead_letters.record(
            db, tables, "auth", event, event.SerializeToString(), 5, "RuntimeError: boom"
        )
        await db.dispose()

    asyncio.run(write())
    return event


def test_dead_letters_lists_and_replay_needs_a_reachable_bus(tmp_path, monkeypatch, capsys):
    url = f"sqlite+aiosqlite:///{tmp_path / 'learnmesh.db'}"
    monkeypatch.setenv("LEARNMESH_DATABASE_URL", url)
    monkeypatch.delenv("LEARNMESH_BUS_URL", raising=False)
    event = dead_letter_in_user_tables(url)

    assert cli.main(["events", "dead-letters"]) == 0
    out = capsys.readouterr().out
    assert event.id in out and "user.deleted" in out and "attempts=5" in out
    assert "RuntimeError: boom" in out

    assert cli.main(["events", "replay", event.id]) == 1
    assert "in-process" in capsys.readouterr().err

    monkeypatch.setenv("LEARNMESH_BUS_URL", "nats://127.0.0.1:1")
    assert cli.main(["events", "dead-letters"]) == 0
    assert event.id in capsys.readouterr().out, "listing needs no bus"


def test_an_empty_database_has_no_dead_letters(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LEARNMESH_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    assert cli.main(["events", "dead-letters"]) == 0
    assert capsys.readouterr().out == ""
