"""The backbone's Prometheus metrics move with what happens."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from learnmesh.eventing import dead_letters
from learnmesh.eventing.memory import InProcessBus
from learnmesh.eventing.relay import Relay
from tests.support.eventing import TABLES, backbone, shop_database, wait_for_effects
from tests.test_eventing_consumer import emit_update, recording


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_backlog_published_consumed_redelivered_dead_lettered_and_lag(tmp_path):
    async with shop_database("sqlite", tmp_path) as db:
        bus = InProcessBus()
        outbox = TABLES.outbox.name
        published = value("learnmesh_events_published_total", type="user.updated")
        consumed = value("learnmesh_events_consumed_total", group="m", type="user.updated")
        redelivered = value("learnmesh_events_redeliveries_total", group="m", type="user.updated")
        dead = value("learnmesh_events_dead_letters_total", group="m", type="user.updated")

        for n in range(3):
            await emit_update(db, f"s{n}", str(n))
        await emit_update(db, "doomed", "9")
        await Relay(db, TABLES.outbox, bus).measure_backlog()
        assert value("learnmesh_outbox_backlog_rows", table=outbox) == 4
        assert value("learnmesh_outbox_oldest_age_seconds", table=outbox) > 0

        async with backbone(db, bus, [recording("m", fail={"doomed": -1})], max_deliveries=2):
            await wait_for_effects(db, 3)
            for _ in range(100):
                if await dead_letters.listing(db, TABLES):
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
        assert value("learnmesh_outbox_backlog_rows", table=outbox) == 0
        assert value("learnmesh_outbox_oldest_age_seconds", table=outbox) == 0
        assert value("learnmesh_events_published_total", type="user.updated") == published + 4
        assert (
            value("learnmesh_events_consumed_total", group="m", type="user.updated") == consumed + 3
        )
        assert (
            value("learnmesh_events_redeliveries_total", group="m", type="user.updated")
            == redelivered + 1
        )
        assert (
            value("learnmesh_events_dead_letters_total", group="m", type="user.updated") == dead + 1
        )
        assert value("learnmesh_events_consumer_lag", group="m") == 0
