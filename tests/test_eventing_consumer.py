"""Consumers end to end (emit → outbox → relay → bus → handler), on SQLite and PostgreSQL:
each committed event is applied once, failures are retried then dead-lettered, replay
works, group members share the work, and one subject's events apply in commit order."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import uuid

import pytest
from sqlalchemy import func, insert, select, update

from learnmesh.eventing import dead_letters
from learnmesh.eventing.handlers import Handlers
from learnmesh.eventing.outbox import emit
from learnmesh.eventing.relay import Relay
from learnmesh.events.v1 import events_pb2
from tests.support.eventing import (
    TABLES,
    CountingBus,
    backbone,
    effect_rows,
    effects,
    open_bus,
    orders,
    shop_database,
    wait_for_effects,
)


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request, tmp_path):
    async with shop_database(request.param, tmp_path) as database:
        yield database


@pytest.fixture(params=["memory", "jetstream"])
async def bus(request):
    async with open_bus(request.param) as found:
        yield found


def recording(group: str, fail: dict[str, int] | None = None) -> Handlers:
    """Handlers of ``group`` that add one effect row per user.updated event; an event whose
    subject is in ``fail`` fails that many times first (a negative count: always)."""
    handlers = Handlers(group)
    failures = fail if fail is not None else {}
    attempts: dict[str, int] = {}

    @handlers.on("user.updated", events_pb2.UserUpdated)
    async def record(session, event, data) -> None:
        await session.execute(
            insert(effects).values(
                group=group, event_id=event.id, subject=event.subject, value=data.changed_fields[0]
            )
        )
        attempts[event.id] = attempts.get(event.id, 0) + 1
        allowed = failures.get(event.subject, 0)
        if allowed < 0 or attempts[event.id] <= allowed:
            raise RuntimeError(f"handler failure {attempts[event.id]} of {event.id}")

    return handlers


async def emit_update(db, subject: str, value: str) -> events_pb2.Event:
    async with db.write_transaction() as s:
        return await emit(
            s,
            TABLES.outbox,
            "user.updated",
            subject,
            events_pb2.UserUpdated(changed_fields=[value]),
        )


async def test_an_event_of_a_rolled_back_change_is_never_delivered(db, bus):
    async with backbone(db, bus, [recording("g")]):
        with pytest.raises(RuntimeError, match="rolled back"):
            await _emit_and_fail(db)
        kept = await emit_update(db, "kept", "1")
        rows = await wait_for_effects(db, 1)
    assert [(r.event_id, r.subject) for r in rows] == [(kept.id, "kept")]


async def _emit_and_fail(db) -> None:
    async with db.write_transaction() as s:
        await s.execute(insert(orders).values(id=str(uuid.uuid4())))
        await emit(s, TABLES.outbox, "user.updated", "lost", events_pb2.UserUpdated())
        raise RuntimeError("rolled back")


async def test_a_handler_failing_twice_applies_its_effect_once(db, bus):
    async with backbone(db, bus, [recording("g", fail={"flaky": 2})]):
        event = await emit_update(db, "flaky", "1")
        rows = await wait_for_effects(db, 1)
    assert [r.event_id for r in rows] == [event.id]
    assert await dead_letters.listing(db, TABLES) == []


async def test_an_always_failing_handler_ends_in_dead_letters_and_replays(db, bus):
    failing = {"doomed": -1}
    async with backbone(db, bus, [recording("g", fail=failing)], max_deliveries=3):
        event = await emit_update(db, "doomed", "1")
        for _ in range(200):
            letters = await dead_letters.listing(db, TABLES)
            if letters:
                break
            await asyncio.sleep(0.05)
        (letter,) = letters
        assert (letter.consumer_group, letter.event_id, letter.attempts) == ("g", event.id, 3)
        assert letter.error == f"RuntimeError: handler failure 3 of {event.id}"
        assert await effect_rows(db) == [], "a failed handler's effect rolls back"
        failing.clear()
        assert await dead_letters.replay(db, TABLES, bus, event.id) == 1
        rows = await wait_for_effects(db, 1)
    assert [r.event_id for r in rows] == [event.id]
    assert await dead_letters.listing(db, TABLES) == []
    assert await dead_letters.replay(db, TABLES, bus, event.id) == 0


async def test_a_duplicate_publish_changes_nothing(db, bus):
    """A relay that died between publishing and marking publishes again: the bus's
    duplicate window drops it, and a copy under another message id finds the processed
    row."""
    async with backbone(db, bus, [recording("g")], relays=0):
        async with db.write_transaction() as s:
            event = await emit(
                s,
                TABLES.outbox,
                "user.updated",
                "dup",
                events_pb2.UserUpdated(changed_fields=["1"]),
            )
        async with db.transaction() as s:
            (payload,) = (await s.execute(select(TABLES.outbox.c.payload))).one()
        subject = bus.subject_for("user.updated")
        await bus.publish(subject, payload, event.id, "dup")
        await bus.publish(subject, payload, event.id, "dup")
        await bus.publish(subject, payload, f"{event.id}-again", "dup")
        rows = await wait_for_effects(db, 1)
        await asyncio.sleep(0.5)
        rows = await effect_rows(db)
    assert [r.event_id for r in rows] == [event.id]


async def test_two_members_of_one_group_share_the_events_once(db, bus):
    async with backbone(db, bus, [recording("g"), recording("g"), recording("other")]):
        sent = [await emit_update(db, f"s{n}", str(n)) for n in range(40)]
        rows = await wait_for_effects(db, 80)
    by_group: dict[str, list[str]] = {}
    for row in rows:
        by_group.setdefault(row.group, []).append(row.event_id)
    assert sorted(by_group["g"]) == sorted(e.id for e in sent)
    assert sorted(by_group["other"]) == sorted(e.id for e in sent)


async def test_two_members_split_the_work_or_take_over(tmp_path, bus):
    """On the in-process bus both members of a group take part (with a slow handler, one
    alone cannot drain the events); on JetStream one is active, and the other takes over
    when it stops. Either way each event's effect commits once."""
    async with shop_database("sqlite", tmp_path) as db:

        def member(i: int) -> Handlers:
            handlers = Handlers("g")

            @handlers.on("user.updated", events_pb2.UserUpdated)
            async def slow(session, event, data) -> None:
                await asyncio.sleep(0.02)
                await session.execute(
                    insert(effects).values(
                        group="g", event_id=event.id, subject=event.subject, value=str(i)
                    )
                )

            return handlers

        async with backbone(db, bus, [member(0)], batch=2):
            async with backbone(db, bus, [member(1)], relays=0, batch=2):
                for n in range(40):
                    await emit_update(db, f"s{n}", str(n))
                await wait_for_effects(db, 20)
            # The second member stopped (some of its work unfinished); the first goes on.
            for n in range(40, 60):
                await emit_update(db, f"s{n}", str(n))
            rows = await wait_for_effects(db, 60)
        assert len(rows) == 60 and len({r.event_id for r in rows}) == 60
        by_member = {value: sum(r.value == value for r in rows) for value in ("0", "1")}
        if bus.orders_keys:
            assert min(by_member.values()) > 0, by_member
        else:
            assert by_member["0"] > 0


async def test_per_subject_order_under_concurrent_producers_and_failures(db, bus):
    subjects = [f"order-{n}" for n in range(4)]
    async with db.write_transaction() as s:
        for subject in subjects:
            await s.execute(insert(orders).values(id=subject, count=0))
    # Some events fail once: later events of their subject must wait behind them.
    flaky = {subjects[0]: 1, subjects[2]: 1}

    async def producer(k: int) -> None:
        rng = random.Random(k)
        for _ in range(15):
            subject = rng.choice(subjects)
            async with db.write_transaction() as s:
                count = (
                    await s.execute(
                        update(orders)
                        .where(orders.c.id == subject)
                        .values(count=orders.c.count + 1)
                        .returning(orders.c.count)
                    )
                ).scalar_one()
                await emit(
                    s,
                    TABLES.outbox,
                    "user.updated",
                    subject,
                    events_pb2.UserUpdated(changed_fields=[str(count)]),
                )

    async with backbone(db, bus, [recording("g", fail=flaky), recording("g")], relays=2):
        await asyncio.gather(*(producer(k) for k in range(4)))
        rows = await wait_for_effects(db, 60, within=30)
    assert len(rows) == 60
    for subject in subjects:
        values = [int(r.value) for r in rows if r.subject == subject]
        assert values == list(range(1, len(values) + 1)), subject


async def test_a_producer_killed_before_its_relay_ran_loses_and_duplicates_nothing(db, bus):
    """Crash between commit and publish: a separate process commits changes with their
    events and is SIGKILLed mid-burst; a relay started afterwards delivers each committed
    event once."""
    producer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.eventing_producer",
        db.url.render_as_string(hide_password=False),
        "100000",
        "5",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert producer.stdout is not None
    committed = -1
    try:
        while committed < 30:
            line = await asyncio.wait_for(producer.stdout.readline(), 30)
            assert line.startswith(b"committed"), line
            committed = int(line.split()[1])
    finally:
        producer.send_signal(signal.SIGKILL)
        await producer.wait()
    async with db.transaction() as s:
        changes = (await s.execute(select(func.count()).select_from(orders))).scalar_one()
        events = (await s.execute(select(func.count()).select_from(TABLES.outbox))).scalar_one()
    assert changes == events >= committed + 1, "every committed change has its event"
    async with backbone(db, bus, [recording("g")]):
        rows = await wait_for_effects(db, events, within=30)
    assert len(rows) == events
    assert len({r.event_id for r in rows}) == events
    values = sorted(int(r.value) for r in rows)
    assert values == list(range(events)), "the events of exactly the committed changes"


async def test_a_relay_that_died_before_marking_publishes_again_and_the_effect_is_once(db, bus):
    """Crash between publish and mark: the rows are published, the mark is lost; the next
    relay publishes them again and the consumer applies each once."""
    counting = CountingBus(bus)
    for n in range(5):
        await emit_update(db, f"s{n}", str(n))
    relay = Relay(db, TABLES.outbox, counting)

    async def die_before_marking(session, seqs) -> None:
        raise ConnectionResetError("the relay's process died here")

    relay._mark = die_before_marking  # type: ignore[method-assign]
    with pytest.raises(ConnectionResetError):
        await relay.relay_once()
    async with backbone(db, counting, [recording("g")]):
        rows = await wait_for_effects(db, 5)
    assert len(counting.calls) == 10, "each row published twice"
    assert sorted(r.value for r in rows) == [str(n) for n in range(5)]
