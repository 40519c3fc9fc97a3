"""What the relay and the consumers need of a bus, whichever carries the events.

Two implementations: ``InProcessBus`` (learnmesh.eventing.memory, the default: nothing to
install, one process) and ``JetStreamBus`` (learnmesh.eventing.jetstream, with
``LEARNMESH_BUS_URL=nats://…``). Both deliver each event once to every consumer group,
shared by the group's members, with explicit ack and nak-with-delay, and drop a second
publish of one message id within their duplicate window. Both also broadcast: every
subscriber of ``broadcast`` gets every message of its types (the revocation feed, which
every process needs whole).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

SUBJECT_PREFIX = "learnmesh.events"
# The header (JetStream) carrying an event's subject, so a consumer can keep the events of
# one subject in order without decoding them first.
KEY_HEADER = "Learnmesh-Key"


class BusUnavailable(ConnectionError):
    """The bus did not take a publish (down, unreachable, timed out); try again later."""


class Delivery(Protocol):
    """One delivery of one message to one member of a consumer group."""

    @property
    def msg_id(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def data(self) -> bytes: ...
    @property
    def deliveries(self) -> int:
        """How many times it has been delivered to the group, this one included."""
        ...

    async def ack(self) -> None: ...
    async def nak(self, delay: float) -> None:
        """Hands it back, to be delivered again after ``delay`` seconds."""
        ...


class Subscription(Protocol):
    async def fetch(self, batch: int, wait: float) -> Sequence[Delivery]:
        """Up to ``batch`` deliveries; none if ``wait`` seconds pass without any."""
        ...

    async def lag(self) -> int:
        """Messages the group has not acknowledged yet."""
        ...


class Broadcast(Protocol):
    """Every message of some types, to this subscriber alone: no group, no ack."""

    @property
    def replaying(self) -> bool:
        """True while messages published before the subscription began are still to come."""
        ...

    async def next(self, wait: float) -> bytes | None:
        """The next message's data; None if ``wait`` seconds pass without one."""
        ...

    async def close(self) -> None: ...


class Bus(Protocol):
    # True when the bus forgets everything with its process (the in-process bus): the
    # relay then publishes the outbox rows it still keeps again at start.
    volatile: bool
    # True when the bus itself never hands out a message while an earlier one of its key is
    # out with any member of the group (the in-process bus); otherwise one member of a group
    # is active at a time (learnmesh.eventing.lease), which keeps a subject's order.
    orders_keys: bool

    def subject_for(self, event_type: str) -> str: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Returns when the bus answers (the admin port's /readyz); raises otherwise."""
        ...

    async def publish(self, subject: str, data: bytes, msg_id: str, key: str) -> None:
        """Returns once the bus holds the message; raises BusUnavailable otherwise."""
        ...

    async def subscribe(self, group: str, event_types: Sequence[str]) -> Subscription:
        """Joins the durable consumer group ``group`` (created on first use)."""
        ...

    async def broadcast(self, event_types: Sequence[str], since: float) -> Broadcast:
        """Every message of ``event_types`` to this subscriber: first those the bus still
        holds that were published at or after ``since`` (epoch seconds), then new ones."""
        ...
