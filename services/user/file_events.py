"""What the user service does with the file service's events: when the file that is a
profile's avatar is deleted (``file.deleted``), the avatar goes, so that no profile points
at a file that no longer exists. It runs in the consumer's transaction, which also records
the event as processed."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from learnmesh.eventing.handlers import Handlers
from learnmesh.events.v1 import events_pb2
from services.user.profiles import forget_avatar

GROUP = "user"


def consumed() -> Handlers:
    handlers = Handlers(GROUP)

    @handlers.on("file.deleted", events_pb2.FileDeleted)
    async def on_file_deleted(
        session: AsyncSession, event: events_pb2.Event, data: events_pb2.FileDeleted
    ) -> None:
        await forget_avatar(session, data.owner_id, data.file_id)

    return handlers
