"""The course service's rules for students: enrolling, completing lessons, progress.

Both writes are idempotent by their natural keys (one enrolment per student and course,
one completion per enrolment and lesson: unique constraints and ``ON CONFLICT DO
NOTHING``), so a retried or doubled call returns what the first made. A course's
enrolment count changes in the same transaction as the enrolment, by one UPDATE of the
counter under the course's lock, so it stays exact however many students enrol at once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from learnmesh.db import Database, utcnow
from learnmesh.eventing.outbox import emit
from learnmesh.events.v1 import events_pb2
from learnmesh.kernel.errors import FailedPrecondition, NotFound
from services.course import store
from services.course.read_cache import ReadCache


@dataclass(frozen=True)
class Enrolled:
    enrollment_id: str
    enrolled_at: datetime


@dataclass(frozen=True)
class Progress:
    course_id: str
    completed_lesson_ids: list[str]
    total_lessons: int
    updated_at: datetime

    @property
    def completed_lessons(self) -> int:
        return len(self.completed_lesson_ids)

    @property
    def percent(self) -> float:
        if self.total_lessons == 0:
            return 0.0
        return 100.0 * self.completed_lessons / self.total_lessons


def _not_enrolled(course_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"you are not enrolled in course {course_id}: enroll first", reason="NOT_ENROLLED"
    )


class Enrolment:
    def __init__(self, db: Database, recent: ReadCache[Any]) -> None:
        self.db = db
        # GetCourse's recent answers: an enrolment changes its course's count.
        self.recent = recent

    async def enroll(self, course_id: str, user_id: str) -> Enrolled:
        """Enrols the user; if they already are, the same enrolment, unchanged."""
        async with self.db.write_transaction() as session:
            course = await store.course(session, course_id, for_update=True)
            if course is None:
                raise NotFound(f"no course {course_id}")
            existing = await store.enrollment(session, course_id, user_id)
            if existing is not None:
                return Enrolled(existing.id, existing.enrolled_at)
            if course.archived_at is not None:
                raise FailedPrecondition(
                    "this course is archived and takes no new students", reason="COURSE_ARCHIVED"
                )
            row = store.EnrollmentRow(
                id=str(uuid.uuid4()), course_id=course_id, user_id=user_id, enrolled_at=utcnow()
            )
            if not await store.add_enrollment(session, row):
                # Enrolled by a concurrent call meanwhile (it committed first): that one.
                existing = await store.enrollment(session, course_id, user_id)
                assert existing is not None
                return Enrolled(existing.id, existing.enrolled_at)
            await store.bump(session, course_id, "enrollment_count", 1)
            created = events_pb2.EnrollmentCreated(
                enrollment_id=row.id, course_id=course_id, user_id=user_id
            )
            await emit(session, store.events.outbox, "enrollment.created", course_id, created)
        self.recent.forget(course_id)
        return Enrolled(row.id, row.enrolled_at)

    async def complete(self, course_id: str, lesson_id: str, user_id: str) -> Progress:
        """Marks the lesson completed (once) and answers the progress after it."""
        async with self.db.write_transaction() as session:
            course = await store.course(session, course_id)
            if course is None:
                raise NotFound(f"no course {course_id}")
            enrollment = await store.enrollment(session, course_id, user_id)
            if enrollment is None:
                raise _not_enrolled(course_id)
            if await store.lesson(session, course_id, lesson_id) is None:
                raise NotFound(f"no lesson {lesson_id} in course {course_id}")
            now = utcnow()
            recorded = await store.add_completion(session, enrollment.id, lesson_id, now)
            done = await store.completed(session, enrollment.id)
            progress = Progress(
                course_id, done.lesson_ids, course.lesson_count, done.last_at or now
            )
            if recorded:
                updated = events_pb2.ProgressUpdated(
                    course_id=course_id,
                    user_id=user_id,
                    completed_lessons=progress.completed_lessons,
                    total_lessons=progress.total_lessons,
                )
                await emit(session, store.events.outbox, "progress.updated", user_id, updated)
            return progress

    async def progress(self, course_id: str, user_id: str) -> Progress:
        async with self.db.transaction() as session:
            course = await store.course(session, course_id)
            if course is None:
                raise NotFound(f"no course {course_id}")
            enrollment = await store.enrollment(session, course_id, user_id)
            if enrollment is None:
                raise _not_enrolled(course_id)
            done = await store.completed(session, enrollment.id)
        return Progress(
            course_id, done.lesson_ids, course.lesson_count, done.last_at or enrollment.enrolled_at
        )
