"""emit(): the outbox row commits or rolls back with the change; commits wake relays."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from sqlalchemy import func, insert, select

from learnmesh.eventing.outbox import emit, notify_channel, stop_waking, wake_on_commit
from learnmesh.events.v1 import events_pb2
from tests.support.eventing import TABLES, create_schema_only, orders, shop_database


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request, tmp_path):
    async with shop_database(request.param, tmp_path) as database:
        yield database


async def outbox_rows(db):
    async with db.transaction() as s:
        return (await s.execute(select(TABLES.outbox).order_by(TABLES.outbox.c.seq))).all()


async def emit_then_fail(db):
    """A change that emits an event, then fails: its transaction rolls back."""
    with pytest.raises(RuntimeError, match="the change fails"):
        await _emit_and_raise(db)


async def _emit_and_raise(db):
    async with db.write_transaction() as s:
        await emit(s, TABLES.outbox, "user.deleted", "u1", events_pb2.UserDeleted())
        raise RuntimeError("the change fails")


async def test_emit_writes_the_event_with_the_change(db):
    order_id = str(uuid.uuid4())
    async with db.write_transaction() as s:
        await s.execute(insert(orders).values(id=order_id))
        built = await emit(
            s, TABLES.outbox, "user.created", order_id, events_pb2.UserCreated(user_id=order_id)
        )
    (row,) = await outbox_rows(db)
    event = events_pb2.Event.FromString(row.payload)
    assert event == built
    assert (row.id, row.type, row.subject, row.published_at) == (
        event.id,
        "user.created",
        order_id,
        None,
    )
    assert event.source == "shop"
    uuid.UUID(event.id)
    data = events_pb2.UserCreated()
    assert event.data.Unpack(data) and data.user_id == order_id
    assert abs((event.time.ToDatetime() - row.created_at.replace(tzinfo=None)).total_seconds()) < 1


async def test_rollback_leaves_no_row_and_wakes_nobody(db):
    waiter = wake_on_commit(TABLES.outbox.name)
    try:
        await emit_then_fail(db)
        assert not waiter.is_set()
        assert await outbox_rows(db) == []
        async with db.write_transaction() as s:
            await emit(s, TABLES.outbox, "user.deleted", "u1", events_pb2.UserDeleted())
            assert not waiter.is_set(), "woken before the commit"
        assert waiter.is_set()
    finally:
        stop_waking(TABLES.outbox.name, waiter)


async def test_sequence_grows_and_is_never_reused(db):
    for _ in range(3):
        async with db.write_transaction() as s:
            await emit(s, TABLES.outbox, "user.updated", "u", events_pb2.UserUpdated())
    seqs = [r.seq for r in await outbox_rows(db)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    async with db.write_transaction() as s:
        await s.execute(TABLES.outbox.delete())
    async with db.write_transaction() as s:
        await emit(s, TABLES.outbox, "user.updated", "u", events_pb2.UserUpdated())
    (row,) = await outbox_rows(db)
    assert row.seq > max(seqs)


async def test_concurrent_emitters_get_distinct_ids(db):
    async def one(i: int) -> None:
        async with db.write_transaction() as s:
            await emit(s, TABLES.outbox, "user.updated", f"s{i % 3}", events_pb2.UserUpdated())

    await asyncio.gather(*(one(i) for i in range(20)))
    rows = await outbox_rows(db)
    assert len({r.id for r in rows}) == 20


async def test_the_migration_helper_creates_the_tables(db):
    await create_schema_only(db)
    async with db.transaction() as s:
        assert (await s.execute(select(func.count()).select_from(TABLES.outbox))).scalar() == 0


async def test_postgres_notifies_other_processes_only_on_commit(tmp_path):
    async with shop_database("postgres", tmp_path) as db:
        dsn = db.url.set(drivername="postgresql").render_as_string(hide_password=False)
        got: asyncio.Queue[str] = asyncio.Queue()
        listener = await asyncpg.connect(dsn)
        try:
            await listener.add_listener(
                notify_channel(TABLES.outbox.name), lambda *args: got.put_nowait(args[2])
            )
            await emit_then_fail(db)
            async with db.transaction() as s:
                await emit(s, TABLES.outbox, "user.deleted", "u", events_pb2.UserDeleted())
                await emit(s, TABLES.outbox, "user.deleted", "v", events_pb2.UserDeleted())
            await asyncio.wait_for(got.get(), 5)
            await asyncio.sleep(0.2)
            assert got.empty(), "one notification per committed transaction"
        finally:
            await listener.close()
