"""The relay: committed outbox rows reach the bus in order per subject, once; a bus that is
down loses nothing; other processes' commits wake it on PostgreSQL; published rows go."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time

import pytest
from sqlalchemy import func, select

from learnmesh.eventing.bus import BusUnavailable
from learnmesh.eventing.memory import InProcessBus
from learnmesh.eventing.outbox import emit
from learnmesh.eventing.relay import Relay
from learnmesh.events.v1 import events_pb2
from tests.support.eventing import TABLES, CountingBus, drain, shop_database


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request, tmp_path):
    async with shop_database(request.param, tmp_path) as database:
        yield database


async def emit_some(db, count: int, subjects: int = 1, prefix: str = "s") -> None:
    for n in range(count):
        async with db.write_transaction() as s:
            await emit(
                s,
                TABLES.outbox,
                "user.updated",
                f"{prefix}{n % subjects}",
                events_pb2.UserUpdated(changed_fields=[str(n)]),
            )


@contextlib.asynccontextmanager
async def relaying(db, bus, **options):
    relay = Relay(db, TABLES.outbox, bus, **options)
    task = asyncio.create_task(relay.run())
    try:
        yield relay
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def unpublished(db) -> int:
    async with db.transaction() as s:
        query = select(func.count()).where(TABLES.outbox.c.published_at.is_(None))
        return int((await s.execute(query)).scalar_one())


def order_of(events) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    for event in events:
        data = events_pb2.UserUpdated()
        event.data.Unpack(data)
        seen.setdefault(event.subject, []).append(int(data.changed_fields[0]))
    return seen


async def test_publishes_in_order_per_subject_and_marks(db):
    bus = InProcessBus()
    subscription = await bus.subscribe("g", ["user.updated"])
    await emit_some(db, 30, subjects=3)
    relay = Relay(db, TABLES.outbox, bus, batch=7)
    total = 0
    while published := await relay.relay_once():
        total += published
    assert total == 30
    assert await unpublished(db) == 0
    events = await drain(subscription, 30)
    assert len({e.id for e in events}) == 30
    for subject, numbers in order_of(events).items():
        assert numbers == sorted(numbers), subject


async def test_wakes_at_once_after_a_commit_of_its_process(db):
    bus = InProcessBus()
    subscription = await bus.subscribe("g", ["user.updated"])
    async with relaying(db, bus, poll_interval=60):
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await emit_some(db, 1)
        (event,) = await drain(subscription, 1, within=5)
        assert time.monotonic() - started < 1.0
    assert event.type == "user.updated"


async def test_a_bus_that_is_down_loses_nothing(db):
    bus = CountingBus(InProcessBus())
    subscription = await bus.subscribe("g", ["user.updated"])
    bus.down = True
    async with relaying(db, bus, poll_interval=0.1, retry_base=0.05, retry_max=0.2) as relay:
        await emit_some(db, 20, subjects=4)
        await asyncio.sleep(0.5)
        assert await unpublished(db) == 20
        rows, age = await relay.measure_backlog()
        assert rows == 20 and age > 0
        bus.down = False
        events = await drain(subscription, 20)
    assert len(events) == 20 and len({e.id for e in events}) == 20
    assert len(bus.calls) == 20, "every row published once"
    for numbers in order_of(events).values():
        assert numbers == sorted(numbers)


async def test_purges_rows_published_before_the_retention(db):
    bus = InProcessBus()
    await emit_some(db, 5)
    relay = Relay(db, TABLES.outbox, bus, retention=3600)
    assert await relay.relay_once() == 5
    assert await relay.purge_published() == 0
    relay.retention = 0.0
    await emit_some(db, 1)
    assert await relay.purge_published() == 5
    async with db.transaction() as s:
        assert (await s.execute(select(func.count()).select_from(TABLES.outbox))).scalar() == 1


async def test_a_new_process_republishes_what_a_volatile_bus_lost(db):
    await emit_some(db, 4)
    first = Relay(db, TABLES.outbox, InProcessBus())
    assert await first.relay_once() == 4
    # The process dies with its in-process bus; the next one starts with an empty bus.
    bus = InProcessBus()
    subscription = await bus.subscribe("g", ["user.updated"])
    async with relaying(db, bus):
        events = await drain(subscription, 4)
    assert len({e.id for e in events}) == 4


async def test_postgres_replicas_publish_each_row_once_in_order(tmp_path):
    async with shop_database("postgres", tmp_path) as db:
        bus = CountingBus(InProcessBus())
        subscription = await bus.subscribe("g", ["user.updated"])
        async with (
            relaying(db, bus, poll_interval=0.05, batch=10),
            relaying(db, bus, poll_interval=0.05, batch=10),
            relaying(db, bus, poll_interval=0.05, batch=10),
        ):
            await asyncio.gather(*(emit_some(db, 40, 4, prefix=f"p{i}-") for i in range(4)))
            events = await drain(subscription, 160)
            await asyncio.sleep(0.3)
        assert len(events) == 160
        assert len(bus.calls) == 160, "no row published twice"
        for numbers in order_of(events).values():
            assert numbers == sorted(numbers)


async def test_postgres_wakes_on_a_commit_of_another_process(tmp_path):
    async with shop_database("postgres", tmp_path) as db:
        bus = InProcessBus()
        subscription = await bus.subscribe("g", ["user.updated"])
        async with relaying(db, bus, poll_interval=60):
            await asyncio.sleep(0.5)
            producer = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.support.eventing_producer",
                db.url.render_as_string(hide_password=False),
                "1",
                stdout=asyncio.subprocess.PIPE,
            )
            try:
                assert producer.stdout is not None
                line = await asyncio.wait_for(producer.stdout.readline(), 30)
                assert line.startswith(b"committed")
                committed = time.monotonic()
                (event,) = await drain(subscription, 1, within=5)
                assert time.monotonic() - committed < 1.0, "woken by NOTIFY, not the poll"
            finally:
                producer.kill()
                await producer.wait()
        assert event.subject == "subject-0"


async def test_marks_survive_a_partial_failure(db):
    """Rows published before the bus went down are marked; the rest stay for later."""
    bus = CountingBus(InProcessBus())
    await emit_some(db, 3)
    relay = Relay(db, TABLES.outbox, bus)
    original = bus.inner.publish

    async def go_down_after_one(*args):
        bus.down = True
        await original(*args)

    bus.inner.publish = go_down_after_one
    with pytest.raises(BusUnavailable):
        await relay.relay_once()
    assert await unpublished(db) == 2
    bus.down = False
    bus.inner.publish = original
    assert await relay.relay_once() == 2
    assert len(bus.calls) == 3
