"""What the course service does with the user service's events.

``user.updated`` naming the display name marks the stored name due, so the next read on
any replica asks the user service; ``user.deleted`` archives the courses the user taught
(their students keep their progress) and removes the user's own enrolments and progress.
Each runs in the consumer's transaction, which also records the event as processed: a
redelivered event changes nothing the second time.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from learnmesh import audit
from learnmesh.db import utcnow
from learnmesh.eventing.handlers import Handlers
from learnmesh.events.v1 import events_pb2
from services.course import store
from services.course.instructors import Instructors
from services.course.read_cache import ReadCache

# The course service's consumer group, shared by its replicas.
GROUP = "course"


def consumed(instructors: Instructors, recent: ReadCache[Any]) -> Handlers:
    handlers = Handlers(GROUP)

    @handlers.on("user.updated", events_pb2.UserUpdated)
    async def on_user_updated(
        session: AsyncSession, event: events_pb2.Event, data: events_pb2.UserUpdated
    ) -> None:
        if "display_name" in data.changed_fields:
            await store.mark_refresh_due(session, data.user_id)
            instructors.forget(data.user_id)
            recent.clear()

    @handlers.on("user.deleted", events_pb2.UserDeleted)
    async def on_user_deleted(
        session: AsyncSession, event: events_pb2.Event, data: events_pb2.UserDeleted
    ) -> None:
        archived = await store.archive_taught_by(session, data.user_id, utcnow())
        left = await store.forget_student(session, data.user_id)
        recent.clear()  # courses archived, counts lowered
        await audit.record(
            session,
            store.course_audit,
            "user.forgotten",
            data.user_id,
            archived_courses=archived,
            enrolments=len(left),
        )

    return handlers
