"""What the file service does with the user service's events: ``user.deleted`` removes the
user's files (their rows in the consumer's transaction, which also records the event as
processed; their objects with the next orphan sweep)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from learnmesh.eventing.handlers import Handlers
from learnmesh.events.v1 import events_pb2
from services.file.library import forget_owner

GROUP = "file"


def consumed() -> Handlers:
    handlers = Handlers(GROUP)

    @handlers.on("user.deleted", events_pb2.UserDeleted)
    async def on_user_deleted(
        session: AsyncSession, event: events_pb2.Event, data: events_pb2.UserDeleted
    ) -> None:
        await forget_owner(session, data.user_id)

    return handlers
