"""A consumer group's member: takes deliveries from the bus and applies them once each.

Each delivery runs in one database transaction: the event id goes into the service's
processed-events table (primary key: group + event id) — already there means a redelivery
or a duplicate publish, which is acked and changes nothing — then the handler runs with the
same session, the transaction commits, and only then is the delivery acked. A crash before
the ack redelivers an event whose effect is committed, and its processed row makes the
second delivery a no-op.

A failing handler's delivery is nakked with an exponential backoff; once it has been
delivered ``max_deliveries`` times it goes to the dead-letter table with the last error and
is acked (``dead_letters.replay`` publishes it again). Events about one subject are applied
one after the other in the order the bus holds them (commit order): a member works on the
subjects of a batch concurrently but on each subject's events in order, and when one fails
it hands back the later events of that subject too, and holds off that subject until the
failed one's redelivery is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from learnmesh.db import Database, utcnow
from learnmesh.eventing import dead_letters, metrics
from learnmesh.eventing.bus import Bus, BusUnavailable, Delivery, Subscription
from learnmesh.eventing.handlers import EventHandler, Handlers
from learnmesh.eventing.tables import EventTables
from learnmesh.events.v1 import events_pb2

log = logging.getLogger("learnmesh.eventing.consumer")
tracer = trace.get_tracer("learnmesh.eventing")
_propagator = TraceContextTextMapPropagator()
# Later events of a subject come back this much after the failed one they wait behind.
HELD_BACK_STEP = 0.01
LAG_INTERVAL = 5.0


class Consumer:
    """One member of ``handlers.group``, consuming from ``bus`` until cancelled (``run``)."""

    def __init__(
        self,
        db: Database,
        tables: EventTables,
        bus: Bus,
        handlers: Handlers,
        *,
        max_deliveries: int = 5,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        batch: int = 64,
        fetch_wait: float = 1.0,
    ) -> None:
        self.db = db
        self.tables = tables
        self.bus = bus
        self.handlers = handlers
        self.group = handlers.group
        self.max_deliveries = max_deliveries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.batch = batch
        self.fetch_wait = fetch_wait
        # Subjects held off until (monotonic time): an earlier event of theirs failed.
        self._held: dict[str, float] = {}

    def backoff(self, deliveries: int) -> float:
        """The redelivery delay after the ``deliveries``-th delivery failed."""
        return float(min(self.backoff_max, self.backoff_base * 2 ** (deliveries - 1)))

    async def run(self) -> None:
        subscription = await self.bus.subscribe(self.group, self.handlers.event_types)
        failures = 0
        last_lag = 0.0
        while True:
            try:
                deliveries = await subscription.fetch(self.batch, self.fetch_wait)
                if time.monotonic() - last_lag >= LAG_INTERVAL:
                    await self._measure_lag(subscription)
                    last_lag = time.monotonic()
            except (BusUnavailable, OSError) as exc:
                failures += 1
                delay = self.backoff(failures)
                log.warning("consumer %s cannot fetch: %s; again in %.1fs", self.group, exc, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            await self.process(deliveries)

    async def _measure_lag(self, subscription: Subscription) -> None:
        metrics.CONSUMER_LAG.labels(self.group).set(await subscription.lag())

    async def process(self, deliveries: Sequence[Delivery]) -> None:
        """Applies a batch: subjects concurrently, each subject's deliveries in order."""
        by_key: dict[str, list[Delivery]] = {}
        for delivery in deliveries:
            by_key.setdefault(delivery.key, []).append(delivery)
        done = await asyncio.gather(
            *(self._in_order(key, found) for key, found in by_key.items()),
            return_exceptions=True,
        )
        for outcome in done:
            if isinstance(outcome, BaseException):
                # An ack or nak the bus did not take: the delivery comes back after its
                # ack wait, and the processed table absorbs it if it was applied.
                log.warning("consumer %s: %s", self.group, dead_letters.describe_error(outcome))

    async def _in_order(self, key: str, deliveries: list[Delivery]) -> None:
        for n, delivery in enumerate(deliveries):
            held_until = self._held.get(key, 0.0)
            wait = held_until - time.monotonic()
            if wait <= 0:
                self._held.pop(key, None)
                redeliver_in = await self.handle(delivery)
                if redeliver_in is None:
                    continue
                self._held[key] = time.monotonic() + redeliver_in
                wait = redeliver_in
                n += 1
            for step, later in enumerate(deliveries[n:], start=1):
                await later.nak(wait + step * HELD_BACK_STEP)
            return

    async def handle(self, delivery: Delivery) -> float | None:
        """Applies one delivery; returns in how many seconds it comes back when nakked."""
        try:
            event = events_pb2.Event.FromString(delivery.data)
        except DecodeError as exc:
            unknown = events_pb2.Event(id=delivery.msg_id[:36], type="?", subject=delivery.key)
            return await self._give_up(delivery, unknown, f"undecodable event: {exc}")
        handler = self.handlers.by_type.get(event.type)
        if handler is None:
            await delivery.ack()
            return None
        parent = _propagator.extract({"traceparent": event.trace_parent})
        with tracer.start_as_current_span(
            f"{event.type} process",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.operation.type": "process",
                "messaging.consumer.group.name": self.group,
                "messaging.message.id": event.id,
                "learnmesh.event.subject": event.subject,
            },
        ) as span:
            try:
                applied = await self._apply(handler, event)
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR)
                return await self._failed(delivery, event, exc)
        await delivery.ack()
        counter = metrics.CONSUMED if applied else metrics.DUPLICATES
        counter.labels(self.group, event.type).inc()
        return None

    async def _apply(self, handler: EventHandler, event: events_pb2.Event) -> bool:
        """The processed row and the handler's effect in one transaction; False when the
        group had processed the event already."""
        insert = postgresql.insert if self.db.is_postgres else sqlite.insert
        table = self.tables.processed
        async with self.db.write_transaction() as session:
            added = await session.execute(
                insert(table)
                .values(consumer_group=self.group, event_id=event.id, processed_at=utcnow())
                .on_conflict_do_nothing(index_elements=["consumer_group", "event_id"])
            )
            if getattr(added, "rowcount", 1) == 0:
                return False
            data = handler.message()
            if not event.data.Unpack(data):
                raise TypeError(
                    f"{event.type} carries {event.data.TypeName()}, not {data.DESCRIPTOR.full_name}"
                )
            await handler.handle(session, event, data)
        return True

    async def _failed(
        self, delivery: Delivery, event: events_pb2.Event, exc: Exception
    ) -> float | None:
        error = dead_letters.describe_error(exc)
        if delivery.deliveries >= self.max_deliveries:
            return await self._give_up(delivery, event, error)
        delay = self.backoff(delivery.deliveries)
        log.warning(
            "consumer %s: %s %s failed (delivery %d): %s; again in %.1fs",
            self.group,
            event.type,
            event.id,
            delivery.deliveries,
            error,
            delay,
        )
        await delivery.nak(delay)
        metrics.REDELIVERIES.labels(self.group, event.type).inc()
        return delay

    async def _give_up(
        self, delivery: Delivery, event: events_pb2.Event, error: str
    ) -> float | None:
        try:
            await dead_letters.record(
                self.db, self.tables, self.group, event, delivery.data, delivery.deliveries, error
            )
        except (SQLAlchemyError, OSError) as exc:
            delay = self.backoff(delivery.deliveries)
            log.warning("consumer %s cannot write a dead letter: %s", self.group, exc)
            with contextlib.suppress(BusUnavailable, OSError):
                await delivery.nak(delay)
            return delay
        log.error(
            "consumer %s gave up on %s %s after %d deliveries: %s",
            self.group,
            event.type,
            event.id,
            delivery.deliveries,
            error,
        )
        await delivery.ack()
        metrics.DEAD_LETTERS.labels(self.group, event.type).inc()
        return None
