"""The in-process bus: the default, nothing to install, events live in this process only.

It keeps what JetStream would for the mesh's one process: durable consumer groups by name
(each group gets every event once, shared by its members; a group joining late starts from
the messages still retained), explicit ack, nak with a redelivery delay, redelivery after
``ack_wait`` of what a member took and never answered, and a duplicate window per message
id. It also keeps the events of one key (an event's subject) in order within a group: a
message is not handed out while an earlier one of its key is out with a member or waiting
for redelivery. A broadcast subscriber gets every message of its types from the messages
still retained (published at or after its ``since``) on, with no ack.

Nothing survives the process: ``volatile`` tells the relay to publish the outbox rows it
still retains again at start, and consumers drop those they had processed.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from learnmesh.eventing.bus import SUBJECT_PREFIX


@dataclass
class _Message:
    seq: int
    subject: str
    data: bytes
    msg_id: str
    key: str
    at: float
    # Wall-clock publish time, for a broadcast's ``since``.
    published: float = 0.0


@dataclass
class _Entry:
    message: _Message
    deliveries: int = 0
    # Bumped at each hand-out: an answer to an older hand-out is ignored.
    token: int = 0
    deadline: float = 0.0


@dataclass
class _Delivery:
    entry: _Entry
    token: int
    group: _Group

    @property
    def msg_id(self) -> str:
        return self.entry.message.msg_id

    @property
    def key(self) -> str:
        return self.entry.message.key

    @property
    def data(self) -> bytes:
        return self.entry.message.data

    @property
    def deliveries(self) -> int:
        return self.entry.deliveries

    async def ack(self) -> None:
        self.group.settle(self.entry, self.token, redeliver_at=None)

    async def nak(self, delay: float) -> None:
        self.group.settle(self.entry, self.token, redeliver_at=time.monotonic() + delay)


@dataclass
class _Group:
    subjects: frozenset[str]
    ack_wait: float
    ready: list[_Entry] = field(default_factory=list)
    delayed: list[tuple[float, int, _Entry]] = field(default_factory=list)
    in_flight: dict[int, _Entry] = field(default_factory=dict)
    # Keys with a message out with a member or waiting for redelivery.
    busy: Counter[str] = field(default_factory=Counter)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def wants(self, subject: str) -> bool:
        return not self.subjects or subject in self.subjects

    def offer(self, message: _Message) -> None:
        bisect.insort(self.ready, _Entry(message), key=lambda e: e.message.seq)
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def settle(self, entry: _Entry, token: int, redeliver_at: float | None) -> None:
        seq = entry.message.seq
        if entry.token != token or self.in_flight.get(seq) is not entry:
            return
        del self.in_flight[seq]
        if redeliver_at is None:
            self.busy[entry.message.key] -= 1
        else:
            heapq.heappush(self.delayed, (redeliver_at, seq, entry))
        self._notify()

    def _due(self, now: float) -> None:
        while self.delayed and self.delayed[0][0] <= now:
            _, _, entry = heapq.heappop(self.delayed)
            self.busy[entry.message.key] -= 1
            bisect.insort(self.ready, entry, key=lambda e: e.message.seq)
        for seq, entry in list(self.in_flight.items()):
            if entry.deadline <= now:
                del self.in_flight[seq]
                self.busy[entry.message.key] -= 1
                bisect.insort(self.ready, entry, key=lambda e: e.message.seq)

    def _take(self, batch: int, now: float) -> list[_Delivery]:
        taken: list[_Delivery] = []
        kept: list[_Entry] = []
        for entry in self.ready:
            key = entry.message.key
            if len(taken) >= batch or self.busy[key] > 0:
                kept.append(entry)
                continue
            self.busy[key] += 1
            entry.deliveries += 1
            entry.token += 1
            entry.deadline = now + self.ack_wait
            self.in_flight[entry.message.seq] = entry
            taken.append(_Delivery(entry, entry.token, self))
        self.ready = kept
        return taken

    def _next_change(self, now: float, deadline: float) -> float:
        times = [deadline]
        if self.delayed:
            times.append(self.delayed[0][0])
        times.extend(entry.deadline for entry in self.in_flight.values())
        return max(0.0, min(times) - now)


@dataclass
class _Subscription:
    group: _Group

    async def fetch(self, batch: int, wait: float) -> Sequence[_Delivery]:
        deadline = time.monotonic() + wait
        while True:
            now = time.monotonic()
            self.group._due(now)
            taken = self.group._take(batch, now)
            if taken or now >= deadline:
                return taken
            changed = self.group.changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), self.group._next_change(now, deadline))

    async def lag(self) -> int:
        group = self.group
        return len(group.ready) + len(group.delayed) + len(group.in_flight)


@dataclass
class _Broadcast:
    subjects: frozenset[str]
    pending: deque[bytes]
    # How many of ``pending`` were published before the subscription began.
    backlog: int
    listeners: list[_Broadcast]
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, message: _Message) -> None:
        if message.subject in self.subjects:
            self.pending.append(message.data)
            self.arrived.set()

    @property
    def replaying(self) -> bool:
        return self.backlog > 0

    async def next(self, wait: float) -> bytes | None:
        if not self.pending:
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), wait)
            if not self.pending:
                return None
        self.backlog = max(0, self.backlog - 1)
        return self.pending.popleft()

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.listeners.remove(self)


class InProcessBus:
    """The bus of one process (see the module's docstring)."""

    volatile = True
    orders_keys = True

    def __init__(
        self,
        *,
        subject_prefix: str = SUBJECT_PREFIX,
        duplicate_window: float = 900.0,
        ack_wait: float = 30.0,
    ) -> None:
        self.subject_prefix = subject_prefix
        self.duplicate_window = duplicate_window
        self.ack_wait = ack_wait
        self._seq = 0
        # Retained for the duplicate window: message ids seen, and the messages themselves
        # (a group that joins late starts from them).
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._retained: deque[_Message] = deque()
        self._groups: dict[str, _Group] = {}
        self._broadcasts: list[_Broadcast] = []

    def subject_for(self, event_type: str) -> str:
        return f"{self.subject_prefix}.{event_type}"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None  # it lives in this process: up as long as the process is

    def _forget_old(self, now: float) -> None:
        horizon = now - self.duplicate_window
        while self._seen and next(iter(self._seen.values())) < horizon:
            self._seen.popitem(last=False)
        while self._retained and self._retained[0].at < horizon:
            self._retained.popleft()

    async def publish(self, subject: str, data: bytes, msg_id: str, key: str) -> None:
        now = time.monotonic()
        self._forget_old(now)
        if msg_id in self._seen:
            return
        self._seen[msg_id] = now
        self._seq += 1
        message = _Message(self._seq, subject, data, msg_id, key, now, time.time())
        self._retained.append(message)
        for group in self._groups.values():
            if group.wants(subject):
                group.offer(message)
        for broadcast in self._broadcasts:
            broadcast.offer(message)

    async def broadcast(self, event_types: Sequence[str], since: float) -> _Broadcast:
        subjects = frozenset(self.subject_for(t) for t in event_types)
        self._forget_old(time.monotonic())
        backlog = deque(
            m.data for m in self._retained if m.subject in subjects and m.published >= since
        )
        found = _Broadcast(subjects, backlog, len(backlog), self._broadcasts)
        self._broadcasts.append(found)
        return found

    async def subscribe(self, group: str, event_types: Sequence[str]) -> _Subscription:
        found = self._groups.get(group)
        if found is None:
            subjects = frozenset(self.subject_for(t) for t in event_types)
            found = _Group(subjects, self.ack_wait)
            for message in self._retained:
                if found.wants(message.subject):
                    found.ready.append(_Entry(message))
            self._groups[group] = found
        return _Subscription(found)
