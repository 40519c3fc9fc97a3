"""The in-process bus: groups, ack/nak, redelivery, duplicate window, per-key order."""

from __future__ import annotations

import asyncio
import time

from learnmesh.eventing.memory import InProcessBus

SUBJECT = "learnmesh.events.user.updated"


async def publish(bus: InProcessBus, n: int, key: str = "k", prefix: str = "m") -> None:
    await bus.publish(SUBJECT, str(n).encode(), f"{prefix}{n}", key)


async def test_each_group_gets_every_message_once_shared_by_its_members():
    bus = InProcessBus()
    a1 = await bus.subscribe("a", ["user.updated"])
    a2 = await bus.subscribe("a", ["user.updated"])
    b = await bus.subscribe("b", ["user.updated"])
    for n in range(50):
        await publish(bus, n, key=f"k{n}")
    seen_a: list[bytes] = []

    async def member(subscription) -> None:
        while True:
            got = await subscription.fetch(3, 0.2)
            if not got:
                return
            for delivery in got:
                seen_a.append(delivery.data)
                await asyncio.sleep(0)
                await delivery.ack()

    await asyncio.gather(member(a1), member(a2))
    assert sorted(seen_a) == sorted(str(n).encode() for n in range(50))
    seen_b = [d.data for d in await b.fetch(100, 0.1)]
    assert len(seen_b) == 50
    assert await a1.lag() == 0 and await b.lag() == 50


async def test_other_types_do_not_reach_a_group():
    bus = InProcessBus()
    group = await bus.subscribe("g", ["user.deleted"])
    await publish(bus, 1)
    assert await group.fetch(10, 0.05) == []


async def test_a_duplicate_msg_id_within_the_window_is_dropped():
    bus = InProcessBus(duplicate_window=0.2)
    group = await bus.subscribe("g", ["user.updated"])
    await publish(bus, 1)
    await publish(bus, 1)
    (delivery,) = await group.fetch(10, 0.05)
    await delivery.ack()
    assert await group.fetch(10, 0.05) == []
    await asyncio.sleep(0.25)
    await publish(bus, 1)
    assert len(await group.fetch(10, 0.05)) == 1, "after the window it is a new message"


async def test_nak_redelivers_after_the_delay_and_counts_deliveries():
    bus = InProcessBus()
    group = await bus.subscribe("g", ["user.updated"])
    await publish(bus, 1)
    (first,) = await group.fetch(10, 0.1)
    assert first.deliveries == 1
    started = time.monotonic()
    await first.nak(0.3)
    assert await group.fetch(10, 0.1) == []
    (second,) = await group.fetch(10, 2)
    assert time.monotonic() - started >= 0.3
    assert second.deliveries == 2 and second.msg_id == "m1"
    await first.ack()  # an answer to an older delivery changes nothing
    assert await group.lag() == 1
    await second.ack()
    assert await group.lag() == 0


async def test_an_unanswered_delivery_comes_back_after_ack_wait():
    bus = InProcessBus(ack_wait=0.2)
    group = await bus.subscribe("g", ["user.updated"])
    await publish(bus, 1)
    (taken,) = await group.fetch(10, 0.1)
    (again,) = await group.fetch(10, 2)
    assert again.deliveries == 2
    await taken.ack()
    assert await group.lag() == 1


async def test_one_key_is_never_out_twice_and_stays_in_order():
    bus = InProcessBus()
    group = await bus.subscribe("g", ["user.updated"])
    for n in range(3):
        await publish(bus, n, key="same")
    await publish(bus, 9, key="other")
    got = await group.fetch(10, 0.1)
    assert [d.data for d in got] == [b"0", b"9"]
    await got[0].nak(0.1)
    # 1 and 2 wait behind 0 even while 0 waits for its redelivery.
    assert await group.fetch(10, 0.05) == []
    (again,) = await group.fetch(10, 1)
    assert again.data == b"0"
    await again.ack()
    (next_one,) = await group.fetch(10, 0.1)
    assert next_one.data == b"1"


async def test_a_late_group_starts_from_the_retained_messages():
    bus = InProcessBus()
    for n in range(3):
        await publish(bus, n, key=f"k{n}")
    late = await bus.subscribe("late", ["user.updated"])
    assert len(await late.fetch(10, 0.1)) == 3


async def test_a_waiting_fetch_wakes_on_publish():
    bus = InProcessBus()
    group = await bus.subscribe("g", ["user.updated"])
    waiting = asyncio.create_task(group.fetch(10, 5))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await publish(bus, 1)
    assert len(await waiting) == 1
    assert time.monotonic() - started < 0.5
