"""The NATS JetStream bus, chosen by ``LEARNMESH_BUS_URL=nats://…``.

One stream (``LEARNMESH_EVENTS``) holds the mesh's subjects ``learnmesh.events.>``; it is
created, or updated to these settings, at start: file storage, limits retention (by age
and size), and a duplicate window longer than the relay's retry horizon. Every publish
carries ``Nats-Msg-Id`` = the event id, so a relay that dies after publishing and before
marking publishes a duplicate that JetStream drops (within the window; after it, the
consumers' processed tables drop it). Each consumer group is a durable pull consumer shared
by the group's replicas (one active at a time: JetStream would hand two events of one
subject to two members at once), with explicit acks and nak-with-delay; JetStream's own
max-deliver stays unlimited, as the consumer counts deliveries and moves an event to its
dead-letter table itself (JetStream has no dead-letter queue).

A broadcast is an ordered consumer of this process alone (ephemeral, in memory, no acks,
starting at ``since``): the client watches its heartbeats and recreates it from the last
message it saw after a reconnect or a gap, so a process that lost NATS for a while still
gets every message it missed, in order, while the stream holds them.

Durability warning: JetStream acknowledges a publish once the message is in the server's
memory; by default it syncs to disk only every two minutes (``sync_interval``), so a power
loss can lose acknowledged events that the relay has already deleted from its outbox. Only
a cluster with ``num_replicas`` of 3 or more and ``sync_interval: always`` in the server's
``jetstream`` configuration guarantees that an acknowledged event survives. A single
server with the defaults (as on a development machine) does not.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from learnmesh.eventing.bus import KEY_HEADER, SUBJECT_PREFIX, BusUnavailable

log = logging.getLogger("learnmesh.eventing.jetstream")
STREAM = "LEARNMESH_EVENTS"
MSG_ID_HEADER = "Nats-Msg-Id"
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_-]")
# What a failing NATS call raises: the client's errors, timeouts, a broken connection.
_NATS_ERRORS = (nats.errors.Error, TimeoutError, OSError)


async def _log_error(exc: Exception) -> None:
    log.warning("NATS: %s", str(exc) or type(exc).__name__)


@dataclass
class _Delivery:
    msg: Msg

    @property
    def msg_id(self) -> str:
        return (self.msg.headers or {}).get(MSG_ID_HEADER, "")

    @property
    def key(self) -> str:
        return (self.msg.headers or {}).get(KEY_HEADER, "")

    @property
    def data(self) -> bytes:
        return self.msg.data

    @property
    def deliveries(self) -> int:
        return int(self.msg.metadata.num_delivered or 1)

    async def ack(self) -> None:
        try:
            await self.msg.ack()
        except _NATS_ERRORS as exc:
            raise BusUnavailable(f"ack not sent: {exc}") from exc

    async def nak(self, delay: float) -> None:
        try:
            await self.msg.nak(delay=delay)
        except _NATS_ERRORS as exc:
            raise BusUnavailable(f"nak not sent: {exc}") from exc


@dataclass
class _Subscription:
    pull: JetStreamContext.PullSubscription

    async def fetch(self, batch: int, wait: float) -> Sequence[_Delivery]:
        try:
            found = await self.pull.fetch(batch, timeout=wait)
        except nats.errors.TimeoutError:
            return []
        except _NATS_ERRORS as exc:
            raise BusUnavailable(f"fetch failed: {exc}") from exc
        return [_Delivery(msg) for msg in found]

    async def lag(self) -> int:
        try:
            info = await self.pull.consumer_info()
        except _NATS_ERRORS as exc:
            raise BusUnavailable(f"consumer info failed: {exc}") from exc
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


@dataclass
class _Broadcast:
    push: JetStreamContext.PushSubscription
    subjects: frozenset[str]
    # Messages of the stream (matching the filter) still to be read: at the start, those
    # the server had not sent yet and those it had sent before this process read them.
    left: int

    @property
    def replaying(self) -> bool:
        return self.left > 0

    async def next(self, wait: float) -> bytes | None:
        """The next matching message's data; None after ``wait`` seconds without one, or
        as soon as the replay is over when its last messages were not of these types."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return None
            try:
                msg = await self.push.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                return None
            except _NATS_ERRORS as exc:
                raise BusUnavailable(f"broadcast failed: {exc}") from exc
            self.left = max(self.left - 1, int(msg.metadata.num_pending or 0))
            if msg.subject in self.subjects:  # one filter subject only on NATS 2.9
                return msg.data
            if self.left == 0:
                # The replay ended on a message of another type: say so now rather than
                # wait for a matching one (a catch-up would take that wait for a timeout).
                return None

    async def close(self) -> None:
        try:
            await self.push.unsubscribe()
        except _NATS_ERRORS as exc:
            log.debug("broadcast unsubscribe: %s", exc)


class JetStreamBus:
    """The mesh's bus on NATS JetStream (see the module's docstring)."""

    volatile = False
    orders_keys = False

    def __init__(
        self,
        url: str,
        *,
        stream: str = STREAM,
        subject_prefix: str = SUBJECT_PREFIX,
        durable_prefix: str = "",
        duplicate_window: float = 900.0,
        max_age: float = 3 * 24 * 3600.0,
        max_bytes: int = -1,
        replicas: int = 1,
        ack_wait: float = 30.0,
        max_ack_pending: int = 1000,
        publish_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        broadcast_heartbeat: float = 2.0,
    ) -> None:
        self.url = url
        self.stream = stream
        self.subject_prefix = subject_prefix
        self.durable_prefix = durable_prefix
        self.duplicate_window = duplicate_window
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.replicas = replicas
        self.ack_wait = ack_wait
        self.max_ack_pending = max_ack_pending
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        # A broadcast missing two heartbeats is recreated from its last message.
        self.broadcast_heartbeat = broadcast_heartbeat
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None

    def subject_for(self, event_type: str) -> str:
        return f"{self.subject_prefix}.{event_type}"

    def stream_config(self) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            subjects=[f"{self.subject_prefix}.>"],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            duplicate_window=self.duplicate_window,
            max_age=self.max_age,
            max_bytes=self.max_bytes,
            num_replicas=self.replicas,
        )

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise BusUnavailable("the JetStream bus is not started")
        return self._js

    async def start(self) -> None:
        """Connects (reconnecting for ever once connected) and creates or updates the
        stream; raises BusUnavailable when NATS cannot be reached."""
        try:
            # The client would retry a first connection for ever (it reconnects for ever
            # once connected): a start that cannot connect gives up after connect_timeout.
            self._nc = await asyncio.wait_for(
                nats.connect(
                    self.url,
                    name="learnmesh",
                    connect_timeout=2,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    error_cb=_log_error,
                ),
                self.connect_timeout,
            )
            self._js = self._nc.jetstream(timeout=self.publish_timeout)
            await self._ensure_stream()
        except _NATS_ERRORS as exc:
            await self.close()
            raise BusUnavailable(f"NATS JetStream at {self.url}: {exc}") from exc

    async def _ensure_stream(self) -> None:
        config = self.stream_config()
        try:
            await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_stream(config)
                return
            except nats.js.errors.BadRequestError as refused:
                # Another replica created it meanwhile (bring it to these settings below),
                # or NATS refused it, for example as its subjects overlap another stream's.
                try:
                    await self.js.stream_info(self.stream)
                except nats.js.errors.NotFoundError:
                    raise BusUnavailable(
                        f"stream {self.stream} cannot be created: {refused.description}"
                    ) from refused
        await self.js.update_stream(config)

    async def close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()
        self._nc = self._js = None

    async def ping(self) -> None:
        """A round trip to JetStream: the stream's info (raises BusUnavailable)."""
        try:
            await self.js.stream_info(self.stream)
        except _NATS_ERRORS as exc:
            raise BusUnavailable(f"NATS JetStream at {self.url}: {exc}") from exc

    async def delete_stream(self) -> None:
        """Deletes the stream and its consumers (tests, and an operator starting over)."""
        await self.js.delete_stream(self.stream)

    async def publish(self, subject: str, data: bytes, msg_id: str, key: str) -> None:
        try:
            await self.js.publish(
                subject,
                data,
                stream=self.stream,
                headers={MSG_ID_HEADER: msg_id, KEY_HEADER: key},
            )
        except _NATS_ERRORS as exc:
            raise BusUnavailable(f"publish to {subject} failed: {exc}") from exc

    def durable_name(self, group: str) -> str:
        return self.durable_prefix + _NOT_IN_NAME.sub("_", group)

    async def subscribe(self, group: str, event_types: Sequence[str]) -> _Subscription:
        # NATS 2.9 takes one filter subject: the type's own when the group has one.
        subject = (
            self.subject_for(event_types[0])
            if len(event_types) == 1
            else f"{self.subject_prefix}.>"
        )
        durable = self.durable_name(group)
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait,
            max_ack_pending=self.max_ack_pending,
            max_deliver=-1,
            filter_subject=subject,
        )
        try:
            pull = await self.js.pull_subscribe(
                subject, durable=durable, stream=self.stream, config=config
            )
        except _NATS_ERRORS as exc:
            raise BusUnavailable(f"consumer {durable}: {exc}") from exc
        return _Subscription(pull)

    async def broadcast(self, event_types: Sequence[str], since: float) -> _Broadcast:
        subjects = frozenset(self.subject_for(t) for t in event_types)
        subject = next(iter(subjects)) if len(subjects) == 1 else f"{self.subject_prefix}.>"
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=datetime.fromtimestamp(since, UTC),
            filter_subject=subject,
        )
        try:
            push = await self.js.subscribe(
                subject,
                stream=self.stream,
                config=config,
                ordered_consumer=True,
                idle_heartbeat=self.broadcast_heartbeat,
            )
            info = await push.consumer_info()
        except _NATS_ERRORS as exc:
            raise BusUnavailable(f"broadcast of {subject}: {exc}") from exc
        # The client recreates the consumer from this same config, by start sequence after
        # a gap; NATS refuses a start time alongside, so it applies to the first one only.
        config.opt_start_time = None
        # The server starts pushing at once: by the time of this answer it may have sent
        # part of the backlog already (``delivered``) and holds the rest (``num_pending``).
        sent = info.delivered.consumer_seq if info.delivered is not None else 0
        backlog = int(info.num_pending or 0) + int(sent or 0)
        return _Broadcast(push, subjects, backlog)
