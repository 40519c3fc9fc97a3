"""The test schema of the eventing tests: one service "shop" with an orders table and its
event tables, on a scratch SQLite or PostgreSQL database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, select

from learnmesh.db import Database
from learnmesh.eventing.bus import BusUnavailable
from learnmesh.eventing.tables import EventTables, create_event_tables, event_tables
from learnmesh.events.v1 import events_pb2
from tests.conftest import IN_CI, scratch_database

NATS_URL = os.environ.get("LEARNMESH_TEST_NATS_URL", "nats://127.0.0.1:4222")

metadata = MetaData()
orders = Table(
    "shop_orders",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("count", Integer, nullable=False, default=0),
)
# Where the test handlers apply their effect: one row per handled event.
effects = Table(
    "shop_effects",
    metadata,
    Column("n", Integer, primary_key=True, autoincrement=True),
    Column("group", String(64), nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("subject", String(64), nullable=False),
    Column("value", String(64), nullable=False),
)
TABLES: EventTables = event_tables("shop", metadata)


@asynccontextmanager
async def shop_database(backend: str, tmp: Path) -> AsyncIterator[Database]:
    """A Database holding the shop schema, on ``backend`` ("sqlite" or "postgres")."""
    async with scratch_database(backend, tmp) as url:
        db = Database(url)
        async with db.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        try:
            yield db
        finally:
            await db.dispose()


async def create_schema_only(db: Database) -> None:
    """The event tables alone, through the migrations' helper."""
    async with db.engine.begin() as conn:
        await conn.run_sync(create_event_tables, "other")


async def nats_unreachable() -> str | None:
    import nats

    try:
        nc = await nats.connect(NATS_URL, connect_timeout=2, max_reconnect_attempts=0)
    except Exception as exc:
        return f"NATS at {NATS_URL} unreachable ({type(exc).__name__}: {exc})"
    try:
        await nc.jetstream().account_info()
    except Exception as exc:
        return f"NATS at {NATS_URL} has no JetStream ({type(exc).__name__}: {exc})"
    finally:
        await nc.close()
    return None


async def require_nats() -> None:
    reason = await nats_unreachable()
    if reason:
        if IN_CI:
            pytest.fail(f"{reason}; CI=true requires NATS JetStream")
        pytest.skip(reason)


class CountingBus:
    """A real bus behind a switch: counts every publish it is asked for (duplicates
    included) and refuses them while ``down`` (a bus that is unreachable)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.volatile = inner.volatile
        self.orders_keys = inner.orders_keys
        self.down = False
        self.calls: list[str] = []

    def subject_for(self, event_type: str) -> str:
        return str(self.inner.subject_for(event_type))

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def ping(self) -> None:
        if self.down:
            raise BusUnavailable("the test bus is down")
        await self.inner.ping()

    async def publish(self, subject: str, data: bytes, msg_id: str, key: str) -> None:
        if self.down:
            raise BusUnavailable("the test bus is down")
        self.calls.append(msg_id)
        await self.inner.publish(subject, data, msg_id, key)

    async def subscribe(self, group: str, event_types: Sequence[str]) -> Any:
        return await self.inner.subscribe(group, event_types)

    async def broadcast(self, event_types: Sequence[str], since: float) -> Any:
        return await self.inner.broadcast(event_types, since)


def decode(data: bytes) -> events_pb2.Event:
    return events_pb2.Event.FromString(data)


async def drain(subscription: Any, want: int, within: float = 10.0) -> list[events_pb2.Event]:
    """Fetches and acks until ``want`` events came (or ``within`` seconds passed)."""
    got: list[events_pb2.Event] = []
    deadline = asyncio.get_running_loop().time() + within
    while len(got) < want and asyncio.get_running_loop().time() < deadline:
        for delivery in await subscription.fetch(100, 0.5):
            got.append(decode(delivery.data))
            await delivery.ack()
    return got


@asynccontextmanager
async def backbone(
    db: Database, bus: Any, handler_sets: Sequence[Any], relays: int = 1, **consumer: Any
) -> AsyncIterator[list[Any]]:
    """Relays of the shop outbox and one consumer per item of ``handler_sets``, running
    until the block ends; yields the consumers."""
    from learnmesh.eventing.consumer import Consumer
    from learnmesh.eventing.relay import Relay

    options = {"backoff_base": 0.05, "backoff_max": 0.5, "fetch_wait": 0.2, **consumer}
    consumers = [Consumer(db, TABLES, bus, handlers, **options) for handlers in handler_sets]
    tasks = [
        asyncio.create_task(Relay(db, TABLES.outbox, bus, poll_interval=0.2).run())
        for _ in range(relays)
    ] + [asyncio.create_task(c.run()) for c in consumers]
    try:
        yield consumers
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def effect_rows(db: Database) -> list[Any]:
    async with db.transaction() as s:
        return list((await s.execute(select(effects).order_by(effects.c.n))).all())


async def wait_for_effects(db: Database, count: int, within: float = 20.0) -> list[Any]:
    """The effect rows once there are ``count`` (or whatever there is after ``within`` s),
    and a moment later, so that an extra (duplicate) effect would show."""
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        if len(await effect_rows(db)) >= count:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    return await effect_rows(db)


@asynccontextmanager
async def mesh_bus(kind: str) -> AsyncIterator[Any]:
    """A bus of ``kind`` for a mesh to start and close (``running_mesh(bus=…)``): the
    in-process one, or JetStream on a stream and subjects of its own, deleted afterwards."""
    if kind == "memory":
        from learnmesh.eventing.memory import InProcessBus

        yield InProcessBus()
        return
    await require_nats()
    from learnmesh.eventing.jetstream import JetStreamBus

    unique = uuid.uuid4().hex[:10]
    stream, prefix = f"TEST_{unique}", f"test.{unique}.events"
    yield JetStreamBus(NATS_URL, stream=stream, subject_prefix=prefix, durable_prefix=f"t{unique}_")
    cleaner = JetStreamBus(NATS_URL, stream=stream, subject_prefix=prefix)
    await cleaner.start()
    try:
        await cleaner.delete_stream()
    finally:
        await cleaner.close()


@asynccontextmanager
async def open_bus(kind: str) -> AsyncIterator[Any]:
    """A started bus of ``kind`` ("memory" or "jetstream"; the latter with a stream and
    subjects of its own, deleted afterwards): ``mesh_bus``'s, started here."""
    async with mesh_bus(kind) as bus:
        if kind == "memory":
            yield bus
            return
        await bus.start()
        try:
            yield bus
        finally:
            await bus.close()  # a mesh given this bus may have closed it already
