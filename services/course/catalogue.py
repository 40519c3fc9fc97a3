"""The course service's rules for courses and lessons: the catalogue, its listing and
search, the update mask, archiving, and who may read an archived course.

Plain Python in and out (levels by lower-case name); ``servicer.py`` converts. Who may
change a course (its instructor or an admin) is decided before any of this runs, by the
access link with the owner resolver (``owner_of``); nothing here checks the caller again.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from learnmesh import audit
from learnmesh.db import Database, utcnow
from learnmesh.eventing.outbox import emit
from learnmesh.events.v1 import events_pb2
from learnmesh.kernel.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from learnmesh.kernel.principal import Principal
from learnmesh.page_tokens import PageTokens
from services.course import store
from services.course.instructors import Instructor, Instructors, Wanted
from services.course.read_cache import ReadCache

LEVELS = ("beginner", "intermediate", "advanced")
DEFAULT_PAGE_SIZE = 20
# ListCourses' order_by values and the ordering each selects ("" is the default).
ORDER_BY = {
    "": "created_at desc",
    "created_at desc": "created_at desc",
    "created_at": "created_at",
    "title": "title",
    "enrollment_count desc": "enrollment_count desc",
}
UPDATABLE_PATHS = ("title", "description", "category", "level")
# Words a search ignores: PostgreSQL's English stop words (tsearch_data/english.stop), so
# that SQLite's FTS5, which keeps every word, finds what PostgreSQL finds.
STOP_WORDS = frozenset(
    """
    i me my myself we our ours ourselves you your yours yourself yourselves he him his
    himself she her hers herself it its itself they them their theirs themselves what
    which who whom this that these those am is are was were be been being have has had
    having do does did doing a an the and but if or because as until while of at by for
    with about against between into through during before after above below to from up
    down in out on off over under again further then once here there when where why how
    all any both each few more most other some such no nor not only own same so than too
    very s t can will just don should now
    """.split()  # noqa: SIM905 - a list this long reads better as words
)
MAX_SEARCH_WORDS = 16
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


def search_words(text: str) -> str:
    """The words a search looks for: letters and digits, lower-case, without stop words,
    each once (an empty string when none is left: such a search finds nothing)."""
    words = [w for w in re.findall(r"[^\W_]+", text.lower()) if w not in STOP_WORDS]
    return " ".join(list(dict.fromkeys(words))[:MAX_SEARCH_WORDS])


def _micros(moment: datetime) -> int:
    return (moment - EPOCH) // MICROSECOND


@dataclass(frozen=True)
class Course:
    id: str
    instructor: Instructor
    title: str
    description: str
    category: str
    level: str
    lesson_count: int
    enrollment_count: int
    created_at: datetime
    updated_at: datetime
    archived: bool


@dataclass(frozen=True)
class CourseFields:
    """CreateCourse's fields, or UpdateCourse's (only those the mask names are applied)."""

    title: str = ""
    description: str = ""
    category: str = ""
    level: str = ""  # "" when the enum was unset


@dataclass(frozen=True)
class CoursePage:
    courses: list[Course]
    next_page_token: str


@dataclass(frozen=True)
class Lesson:
    id: str
    course_id: str
    title: str
    content: str
    position: int
    duration_minutes: int
    created_at: datetime

    @classmethod
    def of(cls, row: store.LessonRow) -> Lesson:
        return cls(
            row.id,
            row.course_id,
            row.title,
            row.content,
            row.position,
            row.duration_minutes,
            row.created_at,
        )


@dataclass(frozen=True)
class LessonPage:
    lessons: list[Lesson]
    next_page_token: str


def _course(row: store.CourseRow, instructor: Instructor) -> Course:
    return Course(
        id=row.id,
        instructor=instructor,
        title=row.title,
        description=row.description,
        category=row.category,
        level=row.level,
        lesson_count=row.lesson_count,
        enrollment_count=row.enrollment_count,
        created_at=row.created_at,
        updated_at=row.updated_at,
        archived=row.archived_at is not None,
    )


def _position(listed: store.Listed, ordering: str) -> list[Any]:
    """The sort key values of a row, as a page token carries them."""
    row = listed.row
    values = {
        "created_at": _micros(row.created_at),
        "id": row.id,
        "title_key": row.title_key,
        "enrollment_count": row.enrollment_count,
        "tier": listed.tier,
    }
    return [values[name] for name in store.ORDERINGS[ordering][0]]


def _resume(position: list[Any], ordering: str, refused: InvalidArgument) -> list[Any]:
    """A signed position back to the values of the keyset query (shape checked again:
    the key may have signed it for another ordering in another version)."""
    names = store.ORDERINGS[ordering][0]
    if len(position) != len(names):
        raise refused
    values: list[Any] = []
    for name, value in zip(names, position, strict=True):
        if name == "created_at":
            if not isinstance(value, int) or isinstance(value, bool):
                raise refused
            try:
                values.append(EPOCH + value * MICROSECOND)
            except OverflowError:
                raise refused from None
        elif name in ("enrollment_count", "tier"):
            if not isinstance(value, int) or isinstance(value, bool):
                raise refused
            values.append(value)
        elif not isinstance(value, str):
            raise refused
        else:
            values.append(value)
    return values


def _not_found(course_id: str) -> NotFound:
    return NotFound(f"no course {course_id}")


def check_uuid(field: str, value: str) -> None:
    """For lookups made before validation (the owner resolver runs in the access link)."""
    try:
        uuid.UUID(value)
    except ValueError:
        raise InvalidArgument.field(field, "must be a UUID") from None


class Catalogue:
    """The rules of courses and lessons over the store."""

    def __init__(
        self,
        db: Database,
        instructors: Instructors,
        courses: PageTokens,
        lessons: PageTokens,
        recent: ReadCache[Any],
    ) -> None:
        self.db = db
        # GetCourse's recent answers (kept by the servicer): a write here drops its course's.
        self.recent = recent
        self.instructors = instructors
        self.course_tokens = courses
        self.lesson_tokens = lessons

    async def _with_instructors(self, listed: Sequence[store.Listed]) -> list[Course]:
        """One question to the user service for the whole page."""
        known = await self.instructors.resolve(
            Wanted(item.row.instructor_id, item.instructor_name, item.refresh_due)
            for item in listed
        )
        return [_course(item.row, known[item.row.instructor_id]) for item in listed]

    async def owner_of(self, course_id: str) -> str | None:
        """The course's instructor, for the access link's ACCESS_OWNER check."""
        check_uuid("course_id", course_id)
        async with self.db.transaction() as session:
            owner = await store.instructor_of(session, course_id)
        if owner is None:
            raise _not_found(course_id)
        return owner

    async def create(self, instructor_id: str, fields: CourseFields) -> Course:
        now = utcnow()
        row = store.CourseRow(
            id=str(uuid.uuid4()),
            instructor_id=instructor_id,
            title=fields.title,
            title_key=fields.title.lower(),
            description=fields.description,
            category=fields.category,
            category_key=fields.category.lower(),
            level=fields.level,
            lesson_count=0,
            enrollment_count=0,
            archived_at=None,
            created_at=now,
            updated_at=now,
        )
        async with self.db.write_transaction() as session:
            await store.add(session, row)
            await audit.record(
                session, store.course_audit, "course.created", row.id, actor=instructor_id
            )
            created = events_pb2.CourseCreated(
                course_id=row.id, instructor_id=instructor_id, title=row.title
            )
            await emit(session, store.events.outbox, "course.created", row.id, created)
            listed = await store.with_instructor(session, row.id)
        assert listed is not None
        return (await self._with_instructors([listed]))[0]

    async def get(self, course_id: str, viewer: Principal | None) -> Course:
        async with self.db.transaction() as session:
            listed = await store.with_instructor(session, course_id)
            if listed is None:
                raise _not_found(course_id)
            if listed.row.archived_at is not None and not await self._may_see_archived(
                session, listed.row, viewer
            ):
                raise _not_found(course_id)
        return (await self._with_instructors([listed]))[0]

    @staticmethod
    async def _may_see_archived(
        session: Any, row: store.CourseRow, viewer: Principal | None
    ) -> bool:
        """An archived course stays visible to its instructor, admins and its students."""
        if viewer is None:
            return False
        if viewer.is_admin or viewer.user_id == row.instructor_id:
            return True
        return await store.is_enrolled(session, row.id, viewer.user_id)

    async def page(
        self,
        *,
        page_size: int | None,
        page_token: str,
        category: str,
        level: str,
        search: str,
        order_by: str,
    ) -> CoursePage:
        size = DEFAULT_PAGE_SIZE if page_size is None else page_size
        if order_by not in ORDER_BY:  # the proto's rule refuses these already
            raise InvalidArgument.field(
                "order_by", "one of " + ", ".join(repr(o) for o in ORDER_BY)
            )
        words = search_words(search) if search.strip() else None
        ordering = "relevance" if words is not None and not order_by else ORDER_BY[order_by]
        category_key = category.lower()
        query = ["courses", ordering, category_key, level, words]
        after = None
        if page_token:
            refused = InvalidArgument.field(
                "page_token",
                "not a next_page_token of this listing with these filters and this order; "
                "start again without one",
            )
            position = self.course_tokens.decode(page_token, query=query)
            after = _resume(position, ordering, refused)
        async with self.db.transaction() as session:
            rows = await store.page(
                session,
                ordering=ordering,
                limit=size + 1,
                after=after,
                category_key=category_key,
                level=level,
                words=words,
            )
        shown = rows[:size]
        token = ""
        if len(rows) > size and shown:
            token = self.course_tokens.encode(_position(shown[-1], ordering), query=query)
        return CoursePage(await self._with_instructors(shown), token)

    async def update(self, course_id: str, fields: CourseFields, paths: Iterable[str]) -> Course:
        masked = list(dict.fromkeys(paths))
        if not masked:
            raise InvalidArgument.field(
                "update_mask", "name at least one field to change: " + ", ".join(UPDATABLE_PATHS)
            )
        unknown = [p for p in masked if p not in UPDATABLE_PATHS]
        if unknown:
            shown = ", ".join(repr(p[:40]) for p in unknown[:3])
            raise InvalidArgument.field(
                "update_mask", f"{shown} cannot be changed; allowed: {', '.join(UPDATABLE_PATHS)}"
            )
        self._check_masked(fields, masked)
        async with self.db.write_transaction() as session:
            row = await store.course(session, course_id, for_update=True)
            if row is None:
                raise _not_found(course_id)
            if row.archived_at is not None:
                raise FailedPrecondition("this course is archived", reason="COURSE_ARCHIVED")
            if "title" in masked:
                row.title, row.title_key = fields.title, fields.title.lower()
            if "description" in masked:
                row.description = fields.description
            if "category" in masked:
                row.category, row.category_key = fields.category, fields.category.lower()
            if "level" in masked:
                row.level = fields.level
            row.updated_at = utcnow()
            await session.flush()
            listed = await store.with_instructor(session, course_id)
        self.recent.forget(course_id)
        assert listed is not None
        return (await self._with_instructors([listed]))[0]

    @staticmethod
    def _check_masked(fields: CourseFields, masked: list[str]) -> None:
        """Empty values the proto lets through (so that unmasked fields may be empty) but
        that a masked field may not be set to."""
        violations = []
        if "title" in masked and not fields.title.strip():
            violations.append(FieldViolation("course.title", "must be 5 to 200 characters"))
        if "description" in masked and not fields.description.strip():
            violations.append(FieldViolation("course.description", "must be 20 to 5000 characters"))
        if "category" in masked and not fields.category.strip():
            violations.append(FieldViolation("course.category", "must be 1 to 50 characters"))
        if "level" in masked and fields.level not in LEVELS:
            violations.append(FieldViolation("course.level", "one of " + ", ".join(LEVELS)))
        if violations:
            raise InvalidArgument(violations)

    async def delete(self, course_id: str, *, actor: str) -> None:
        """Erases a course nobody is enrolled in; archives one with students, who keep
        their progress. Deleting an archived course again changes nothing."""
        async with self.db.write_transaction() as session:
            row = await store.course(session, course_id, for_update=True)
            if row is None:
                raise _not_found(course_id)
            if row.archived_at is not None:
                return
            if row.enrollment_count > 0:
                row.archived_at = row.updated_at = utcnow()
                await session.flush()
                event = "course.archived"
            else:
                await store.erase(session, course_id)
                event = "course.deleted"
            await audit.record(
                session,
                store.course_audit,
                event,
                course_id,
                actor=actor,
                students=row.enrollment_count,
            )
        self.recent.forget(course_id)

    async def create_lesson(
        self, course_id: str, title: str, content: str, duration_minutes: int
    ) -> Lesson:
        """Appends a lesson: its position is the course's new lesson count, taken under the
        course's lock, so concurrent creations get 1, 2, 3… without a gap or a clash."""
        async with self.db.write_transaction() as session:
            course = await store.course(session, course_id, for_update=True)
            if course is None:
                raise _not_found(course_id)
            if course.archived_at is not None:
                raise FailedPrecondition("this course is archived", reason="COURSE_ARCHIVED")
            position = await store.bump(session, course_id, "lesson_count", 1)
            row = store.LessonRow(
                id=str(uuid.uuid4()),
                course_id=course_id,
                title=title,
                content=content,
                position=position,
                duration_minutes=duration_minutes,
                created_at=utcnow(),
            )
            await store.add(session, row)
            course.updated_at = row.created_at
        self.recent.forget(course_id)
        return Lesson.of(row)

    async def lessons(
        self, course_id: str, *, page_size: int | None, page_token: str, viewer: Principal | None
    ) -> LessonPage:
        size = DEFAULT_PAGE_SIZE if page_size is None else page_size
        query = ["lessons", course_id]
        after = 0
        if page_token:
            position = self.lesson_tokens.decode(page_token, query=query)
            if len(position) != 1 or not isinstance(position[0], int):
                raise InvalidArgument.field("page_token", "not a next_page_token of this listing")
            after = position[0]
        async with self.db.transaction() as session:
            course = await store.course(session, course_id)
            if course is None or (
                course.archived_at is not None
                and not await self._may_see_archived(session, course, viewer)
            ):
                raise _not_found(course_id)
            rows = await store.lessons(session, course_id, limit=size + 1, after_position=after)
        shown = [Lesson.of(r) for r in rows[:size]]
        token = ""
        if len(rows) > size and shown:
            token = self.lesson_tokens.encode([shown[-1].position], query=query)
        return LessonPage(shown, token)
