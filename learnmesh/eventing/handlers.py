"""What a service declares to consume events: its consumer group and a handler per type."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession

from learnmesh.events.v1 import events_pb2

M = TypeVar("M", bound=Message)
# A handler gets the session of the transaction that also records the event as processed,
# the event, and its data unpacked into the declared message.
HandlerFn = Callable[[AsyncSession, events_pb2.Event, Any], Awaitable[None]]


@dataclass(frozen=True)
class EventHandler:
    event_type: str
    message: type[Message]
    handle: HandlerFn


@dataclass
class Handlers:
    """A consumer group's handlers, by event type.

    ``group`` names the durable consumer group, shared by every replica of the service:
    each event reaches one member of the group once (for example "auth" or
    "auth.revocations" when a service keeps two groups that progress independently).

        handlers = Handlers("auth")

        @handlers.on("user.deleted", events_pb2.UserDeleted)
        async def forget_user(session, event, data): ...
    """

    group: str
    by_type: dict[str, EventHandler] = field(default_factory=dict)

    def on(
        self, event_type: str, message: type[M]
    ) -> Callable[[Callable[[AsyncSession, events_pb2.Event, M], Awaitable[None]]], HandlerFn]:
        def register(
            fn: Callable[[AsyncSession, events_pb2.Event, M], Awaitable[None]],
        ) -> HandlerFn:
            if event_type in self.by_type:
                raise ValueError(f"{self.group} already handles {event_type}")
            self.by_type[event_type] = EventHandler(event_type, message, fn)
            return fn

        return register

    @property
    def event_types(self) -> list[str]:
        return sorted(self.by_type)
