"""A consumer group's member: takes deliveries from the bus and applies them once each.

Each delivery runs in one database transaction: the event id goes into the service's
processed-events table (primary key: group + event id) — already there means a redelivery
or a duplicate publish, which is acked and changes nothing — then the handler runs with the
same session, the transaction commits, and only then is the delivery acked. A crash before
the ack redelivers an event whose effect is committed, and its processed row makes the
second delivery a no-op. A fetched batch is applied in one such transaction (its events
in the bus's order, one processed row each) and acked once it commits; when any handler of
the batch fails, nothing of it commits and its deliveries are applied one by one as below.

A failing handler's delivery is nakked with an exponential backoff; once its handler has
failed ``max_deliveries`` times it goes to the dead-letter table with the last error and is
acked (``dead_letters.replay`` publishes it again). Attempts are counted by the member, not
taken from the bus's delivery count: an event handed back untried because an earlier one of
its subject failed has been delivered again without being tried, and must not run out of
attempts for it (a member that restarts starts counting again).

Events about one subject are applied one after the other in the order the bus holds them
(commit order). A member works on the subjects of a batch concurrently and on each
subject's events in order. When one fails, the member keeps a line for that subject: the
failed event first, then every later event of the subject it sees, each handed back
untried until the one before it in the line is done (applied or given up), whatever order
the bus redelivers them in. On a bus that does not order a subject's events across members
(JetStream), one member of a group is active at a time (learnmesh.eventing.lease); the
others wait to take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from learnmesh.db import Database, utcnow
from learnmesh.eventing import dead_letters, metrics
from learnmesh.eventing.bus import Bus, BusUnavailable, Delivery, Subscription
from learnmesh.eventing.handlers import EventHandler, Handlers
from learnmesh.eventing.lease import active_member
from learnmesh.eventing.tables import EventTables
from learnmesh.events.v1 import events_pb2

log = logging.getLogger("learnmesh.eventing.consumer")
tracer = trace.get_tracer("learnmesh.eventing")
_propagator = TraceContextTextMapPropagator()
# Events waiting in a subject's line come back this much apart, after its first one.
HELD_BACK_STEP = 0.01
LAG_INTERVAL = 5.0
# Events whose failed attempts a member remembers at most.
MAX_TRACKED_FAILURES = 10_000


@dataclass
class _Line:
    """The events of one subject waiting for the first of them, a failed one."""

    ids: list[str]
    touched: float = 0.0
    # When the first one is due back.
    due: float = 0.0


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
        line_timeout: float = 120.0,
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
        # Subjects with a failed event, by key: the events waiting behind it, in order.
        self._lines: dict[str, _Line] = {}
        # A line whose first event has not come back for this long is dropped.
        self.line_timeout = line_timeout
        # Failed attempts of events not yet applied nor given up, oldest first.
        self._failures: OrderedDict[str, int] = OrderedDict()
        self._stopping = asyncio.Event()

    def backoff(self, deliveries: int) -> float:
        """The redelivery delay after the ``deliveries``-th delivery failed."""
        return float(min(self.backoff_max, self.backoff_base * 2 ** (deliveries - 1)))

    async def run(self) -> None:
        """Consumes until ``stop`` (or until cancelled)."""
        subscription = await self._subscribe()
        if subscription is None:
            return
        if self.bus.orders_keys:
            await self._consume(subscription, self._stopping)
            return
        while not self._stopping.is_set():
            async with active_member(self.db, self.group, retry=self.fetch_wait) as lost:
                await self._consume(subscription, lost)
            if not self._stopping.is_set():
                log.warning("consumer %s lost its active-member lock; waiting for it", self.group)

    def stop(self) -> None:
        """Ends ``run`` once the batch under way is applied (within ``fetch_wait`` when
        idle): no handler's transaction is cancelled halfway."""
        self._stopping.set()

    async def _subscribe(self) -> Subscription | None:
        failures = 0
        while not self._stopping.is_set():
            try:
                return await self.bus.subscribe(self.group, self.handlers.event_types)
            except (BusUnavailable, OSError) as exc:
                failures += 1
                delay = self.backoff(failures)
                log.warning(
                    "consumer %s cannot subscribe: %s; again in %.1fs", self.group, exc, delay
                )
                await self._pause(delay)
        return None

    async def _pause(self, seconds: float) -> None:
        """Sleeps ``seconds``, or less when stopped meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _consume(self, subscription: Subscription, lost: asyncio.Event) -> None:
        """Fetches and applies until ``lost`` is set."""
        failures = 0
        last_lag = 0.0
        while not lost.is_set() and not self._stopping.is_set():
            try:
                deliveries = await subscription.fetch(self.batch, self.fetch_wait)
                # Now and then, and whenever idle (caught up, so the bus is not busy).
                if not deliveries or time.monotonic() - last_lag >= LAG_INTERVAL:
                    await self._measure_lag(subscription)
                    last_lag = time.monotonic()
            except (BusUnavailable, OSError) as exc:
                failures += 1
                delay = self.backoff(failures)
                log.warning("consumer %s cannot fetch: %s; again in %.1fs", self.group, exc, delay)
                await self._pause(delay)
                continue
            failures = 0
            await self.process(deliveries)

    async def _measure_lag(self, subscription: Subscription) -> None:
        metrics.CONSUMER_LAG.labels(self.group).set(await subscription.lag())

    async def process(self, deliveries: Sequence[Delivery]) -> None:
        """Applies a batch: in one transaction when every handler succeeds, else one
        delivery at a time (subjects concurrently, each subject's deliveries in order)."""
        try:
            if not await self._apply_together(deliveries):
                await self._one_by_one(deliveries)
        except asyncio.CancelledError:
            # Stopping: what this member took goes back at once (an answer to a delivery
            # already acked changes nothing; the processed table absorbs one whose
            # transaction committed before its ack).
            for delivery in deliveries:
                with contextlib.suppress(BusUnavailable, OSError):
                    await delivery.nak(0)
            raise

    async def _one_by_one(self, deliveries: Sequence[Delivery]) -> None:
        by_key: dict[str, list[Delivery]] = {}
        for delivery in deliveries:
            by_key.setdefault(delivery.key, []).append(delivery)
        done = await asyncio.gather(
            *(self._in_order(key, found) for key, found in by_key.items()),
            return_exceptions=True,
        )
        self._log_unanswered(done)

    def _log_unanswered(self, outcomes: Sequence[object]) -> None:
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                # An ack or nak the bus did not take: the delivery comes back after its
                # ack wait, and the processed table absorbs it if it was applied.
                log.warning("consumer %s: %s", self.group, dead_letters.describe_error(outcome))

    async def _apply_together(self, deliveries: Sequence[Delivery]) -> bool:
        """The whole batch in one transaction, in the bus's order (so each subject's
        events in order), then acked; False, with nothing committed, when it must go one
        by one: a handler failed, or an event is undecodable, held in a subject's line or
        failed before (those need their attempts counted)."""
        if len(deliveries) < 2:
            return False
        events: list[tuple[Delivery, events_pb2.Event]] = []
        for delivery in deliveries:
            if delivery.key in self._lines:
                return False
            try:
                event = events_pb2.Event.FromString(delivery.data)
            except DecodeError:
                return False
            if event.id in self._failures:
                return False
            events.append((delivery, event))
        handled = [event for _, event in events if event.type in self.handlers.by_type]
        # Each handled delivery and whether it was applied (False: processed already, or
        # a second copy of an event in this batch).
        outcomes: list[tuple[events_pb2.Event, bool]] = []
        try:
            async with self.db.write_transaction() as session:
                new = await self._record_processed(session, handled)
                for event in handled:
                    fresh = event.id in new
                    if fresh:
                        new.discard(event.id)
                        await self._run_handler(session, self.handlers.by_type[event.type], event)
                    outcomes.append((event, fresh))
        except Exception as exc:
            log.debug("consumer %s: batch rolled back (%s); one by one", self.group, exc)
            return False
        self._log_unanswered(
            await asyncio.gather(*(d.ack() for d, _ in events), return_exceptions=True)
        )
        for event, fresh in outcomes:
            counter = metrics.CONSUMED if fresh else metrics.DUPLICATES
            counter.labels(self.group, event.type).inc()
        return True

    async def _record_processed(
        self, session: AsyncSession, events: Sequence[events_pb2.Event]
    ) -> set[str]:
        """Inserts the events' processed rows; returns the ids that were not there yet."""
        if not events:
            return set()
        insert = postgresql.insert if self.db.is_postgres else sqlite.insert
        table = self.tables.processed
        now = utcnow()
        rows = [
            {"consumer_group": self.group, "event_id": event.id, "processed_at": now}
            for event in events
        ]
        added = await session.execute(
            insert(table)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["consumer_group", "event_id"])
            .returning(table.c.event_id)
        )
        return set(added.scalars())

    async def _run_handler(
        self, session: AsyncSession, handler: EventHandler, event: events_pb2.Event
    ) -> None:
        """The handler in a consumer span that continues the emitting call's trace."""
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
        ):
            data = handler.message()
            if not event.data.Unpack(data):
                raise TypeError(
                    f"{event.type} carries {event.data.TypeName()}, not {data.DESCRIPTOR.full_name}"
                )
            await handler.handle(session, event, data)

    async def _in_order(self, key: str, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            await self._deliver(key, delivery)

    async def _deliver(self, key: str, delivery: Delivery) -> None:
        try:
            event = events_pb2.Event.FromString(delivery.data)
        except DecodeError as exc:
            unknown = events_pb2.Event(id=delivery.msg_id[:36], type="?", subject=key)
            await self._give_up(delivery, unknown, f"undecodable event: {exc}")
            return
        now = time.monotonic()
        line = self._lines.get(key)
        if line is not None and now - line.touched > self.line_timeout:
            # Its first event never came back here (another member took over): let go.
            del self._lines[key]
            line = None
        if line is not None and line.ids[0] != event.id:
            if event.id not in line.ids:
                line.ids.append(event.id)
            place = line.ids.index(event.id)
            await delivery.nak(max(line.due - now, 0.0) + place * HELD_BACK_STEP)
            return
        redeliver_in = await self.handle(delivery, event)
        if redeliver_in is None:
            if line is not None:
                line.ids.pop(0)
                line.touched, line.due = now, now
                if not line.ids:
                    del self._lines[key]
            return
        if line is None:
            line = self._lines[key] = _Line([event.id])
        line.touched, line.due = now, now + redeliver_in

    async def handle(self, delivery: Delivery, event: events_pb2.Event) -> float | None:
        """Applies one delivery; returns in how many seconds it comes back when nakked."""
        handler = self.handlers.by_type.get(event.type)
        if handler is None:
            await delivery.ack()
            return None
        try:
            applied = await self._apply(handler, event)
        except Exception as exc:
            return await self._failed(delivery, event, exc)
        self._failures.pop(event.id, None)
        await delivery.ack()
        counter = metrics.CONSUMED if applied else metrics.DUPLICATES
        counter.labels(self.group, event.type).inc()
        return None

    async def _apply(self, handler: EventHandler, event: events_pb2.Event) -> bool:
        """The processed row and the handler's effect in one transaction; False when the
        group had processed the event already."""
        async with self.db.write_transaction() as session:
            if not await self._record_processed(session, [event]):
                return False
            await self._run_handler(session, handler, event)
        return True

    async def _failed(
        self, delivery: Delivery, event: events_pb2.Event, exc: Exception
    ) -> float | None:
        error = dead_letters.describe_error(exc)
        attempts = self._failures.pop(event.id, 0) + 1
        if attempts >= self.max_deliveries:
            return await self._give_up(delivery, event, error, attempts)
        self._failures[event.id] = attempts
        while len(self._failures) > MAX_TRACKED_FAILURES:
            self._failures.popitem(last=False)
        delay = self.backoff(attempts)
        log.warning(
            "consumer %s: %s %s failed (attempt %d): %s; again in %.1fs",
            self.group,
            event.type,
            event.id,
            attempts,
            error,
            delay,
        )
        await delivery.nak(delay)
        metrics.REDELIVERIES.labels(self.group, event.type).inc()
        return delay

    async def _give_up(
        self, delivery: Delivery, event: events_pb2.Event, error: str, attempts: int = 1
    ) -> float | None:
        try:
            await dead_letters.record(
                self.db, self.tables, self.group, event, delivery.data, attempts, error
            )
        except (SQLAlchemyError, OSError) as exc:
            self._failures[event.id] = attempts - 1
            delay = self.backoff(attempts)
            log.warning("consumer %s cannot write a dead letter: %s", self.group, exc)
            with contextlib.suppress(BusUnavailable, OSError):
                await delivery.nak(delay)
            return delay
        log.error(
            "consumer %s gave up on %s %s after %d attempts: %s",
            self.group,
            event.type,
            event.id,
            attempts,
            error,
        )
        await delivery.ack()
        metrics.DEAD_LETTERS.labels(self.group, event.type).inc()
        return None
