"""The relay: publishes a service's committed outbox rows to the bus, in order per subject.

It wakes at once after a commit of its own process that wrote to the table
(``outbox.wake_on_commit``), on PostgreSQL also on the table's NOTIFY channel (a dedicated
asyncpg connection LISTENs, so commits of other processes wake it), and polls every
``poll_interval`` seconds in case a notification was missed. Published rows are marked and
deleted ``retention`` seconds later. When the bus refuses a publish the round stops, what
was published is marked, and the rest waits for the next round after an exponential
backoff (capped at ``retry_max``): nothing is lost, and a row is published again only if
the relay dies between publishing and marking it, which the bus's duplicate window (same
message id = event id) and the consumers' processed tables absorb.

Several replicas relaying one PostgreSQL table: a round runs in one transaction holding a
per-table advisory lock (``pg_try_advisory_xact_lock``), so one relay is active at a time
and the others skip the round (and take over within a poll interval when it dies, as its
lock goes with its connection). ``FOR UPDATE SKIP LOCKED`` would let replicas publish
disjoint rows at once, but then two events about one subject could be published by two
replicas in either order; one active relay keeps the per-subject order that emit's
per-subject lock put into ``seq``, and a relay is not the bottleneck (it publishes subjects
concurrently, each in order). On SQLite one relay runs per database; its marks run in a
BEGIN IMMEDIATE transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import asyncpg
from sqlalchemy import Row, Table, delete, func, select, text, update
from sqlalchemy.exc import SQLAlchemyError

from learnmesh.db import Database, utcnow
from learnmesh.eventing import metrics
from learnmesh.eventing.bus import Bus, BusUnavailable
from learnmesh.eventing.outbox import notify_channel, stop_waking, wake_on_commit

log = logging.getLogger("learnmesh.eventing.relay")

# How long the LISTEN connection may sit idle before it is checked with a query.
LISTEN_CHECK = 30.0


class Relay:
    """Relays one outbox table to ``bus`` until cancelled (``run``)."""

    def __init__(
        self,
        db: Database,
        table: Table,
        bus: Bus,
        *,
        batch: int = 500,
        poll_interval: float = 1.0,
        retention: float = 24 * 3600.0,
        retry_base: float = 0.2,
        retry_max: float = 30.0,
        purge_interval: float = 60.0,
    ) -> None:
        self.db = db
        self.table = table
        self.bus = bus
        self.batch = batch
        self.poll_interval = poll_interval
        self.retention = retention
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.purge_interval = purge_interval
        self._lock_key = f"learnmesh.relay:{table.name}"
        self._stopping = asyncio.Event()
        self._waiter: asyncio.Event | None = None

    def stop(self) -> None:
        """Ends ``run`` after the round under way: no query is cancelled halfway."""
        self._stopping.set()
        if self._waiter is not None:
            self._waiter.set()

    async def run(self) -> None:
        """Relays until ``stop`` (or until cancelled)."""
        waiter = self._waiter = wake_on_commit(self.table.name)
        listener = asyncio.create_task(self._listen(waiter)) if self.db.is_postgres else None
        failures = 0
        last_purge = last_backlog = 0.0
        loop = asyncio.get_running_loop()
        republished = not self.bus.volatile
        try:
            while not self._stopping.is_set():
                waiter.clear()
                try:
                    if not republished:
                        await self._republish_retained()
                        republished = True
                    published = await self.relay_once()
                    if loop.time() - last_purge >= self.purge_interval:
                        await self.purge_published()
                        last_purge = loop.time()
                    # Each idle round, and at most once a second while busy (a COUNT).
                    if published < self.batch or loop.time() - last_backlog >= 1.0:
                        await self.measure_backlog()
                        last_backlog = loop.time()
                except (BusUnavailable, OSError, SQLAlchemyError) as exc:
                    failures += 1
                    delay = min(self.retry_max, self.retry_base * 2 ** (failures - 1))
                    log.warning("relay of %s: %s; next try in %.1fs", self.table.name, exc, delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
                    continue
                failures = 0
                if published >= self.batch:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.wait(), self.poll_interval)
        finally:
            stop_waking(self.table.name, waiter)
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener

    async def relay_once(self) -> int:
        """Publishes up to ``batch`` unpublished rows, oldest first; returns how many.

        Raises BusUnavailable after marking what was published when the bus refused one.
        """
        pending = select(self.table).where(self.table.c.published_at.is_(None))
        pending = pending.order_by(self.table.c.seq).limit(self.batch)
        if self.db.is_postgres:
            async with self.db.transaction() as session:
                locked = await session.execute(
                    text("SELECT pg_try_advisory_xact_lock(hashtext(:key))"),
                    {"key": self._lock_key},
                )
                if not locked.scalar():
                    return 0
                rows = (await session.execute(pending)).all()
                published, error = await self._publish(rows)
                await self._mark(session, published)
        else:
            async with self.db.transaction() as session:
                rows = (await session.execute(pending)).all()
            published, error = await self._publish(rows)
            async with self.db.write_transaction() as session:
                await self._mark(session, published)
        if error is not None:
            raise error
        return len(published)

    async def _republish_retained(self) -> None:
        """Publishes the published rows still kept again, oldest first: a volatile bus lost
        what it held with the previous process (consumers drop what they had applied)."""
        after = 0
        while True:
            async with self.db.transaction() as session:
                query = select(self.table).where(
                    self.table.c.seq > after, self.table.c.published_at.is_not(None)
                )
                rows = (
                    await session.execute(query.order_by(self.table.c.seq).limit(self.batch))
                ).all()
            if not rows:
                return
            _, error = await self._publish(rows)
            if error is not None:
                raise error
            after = rows[-1].seq

    async def _publish(self, rows: Sequence[Row[Any]]) -> tuple[list[int], BusUnavailable | None]:
        """Publishes ``rows``: subjects concurrently, each subject's rows one after the other
        in ``seq`` order, stopping a subject at its first refusal."""
        by_subject: dict[str, list[Row[Any]]] = {}
        for row in rows:
            by_subject.setdefault(row.subject, []).append(row)
        published: list[int] = []
        errors: list[BusUnavailable] = []

        async def one_subject(subject_rows: list[Row[Any]]) -> None:
            for row in subject_rows:
                try:
                    await self.bus.publish(
                        self.bus.subject_for(row.type), row.payload, row.id, row.subject
                    )
                except BusUnavailable as exc:
                    errors.append(exc)
                    return
                published.append(row.seq)
                metrics.PUBLISHED.labels(row.type).inc()

        await asyncio.gather(*(one_subject(r) for r in by_subject.values()))
        if errors:
            metrics.PUBLISH_FAILURES.labels(self.table.name).inc()
        return published, errors[0] if errors else None

    async def _mark(self, session: Any, seqs: list[int]) -> None:
        if seqs:
            marked = update(self.table).where(self.table.c.seq.in_(seqs))
            await session.execute(marked.values(published_at=utcnow()))

    async def purge_published(self) -> int:
        """Deletes rows published more than ``retention`` seconds ago."""
        horizon = utcnow() - timedelta(seconds=self.retention)
        async with self.db.write_transaction() as session:
            result = await session.execute(
                delete(self.table).where(self.table.c.published_at < horizon)
            )
        return int(getattr(result, "rowcount", 0) or 0)

    async def measure_backlog(self) -> tuple[int, float]:
        """Sets the backlog gauges; returns (rows, oldest row's age in seconds)."""
        query = select(func.count(), func.min(self.table.c.created_at)).where(
            self.table.c.published_at.is_(None)
        )
        async with self.db.transaction() as session:
            count, oldest = (await session.execute(query)).one()
        age = 0.0 if oldest is None else max(0.0, (utcnow() - oldest).total_seconds())
        metrics.OUTBOX_BACKLOG.labels(self.table.name).set(count)
        metrics.OUTBOX_OLDEST_AGE.labels(self.table.name).set(age)
        return int(count), age

    async def _listen(self, waiter: asyncio.Event) -> None:
        """LISTENs on the table's channel on a connection of its own, reconnecting."""
        dsn = self.db.url.set(drivername="postgresql").render_as_string(hide_password=False)
        channel = notify_channel(self.table.name)
        while True:
            try:
                conn = await asyncpg.connect(dsn, timeout=10)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                log.warning("relay of %s cannot LISTEN: %s", self.table.name, exc)
                await asyncio.sleep(self.poll_interval)
                continue
            lost = asyncio.Event()
            try:
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(channel, _setter(waiter))
                # What was committed while nobody listened is picked up by this round.
                waiter.set()
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), LISTEN_CHECK)
                    if not lost.is_set():
                        await conn.fetchval("SELECT 1", timeout=10)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                log.warning("relay of %s lost its LISTEN connection: %s", self.table.name, exc)
            finally:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)


def _setter(event: asyncio.Event) -> Callable[..., None]:
    """A callback that sets ``event``, whatever it is called with."""
    return lambda *_args: event.set()
