"""The course service's tables and queries (SQLAlchemy 2; SQLite and PostgreSQL).

Courses, lessons, enrolments and completed lessons, the last known names of instructors,
the shared page-token key, its audit trail and event tables. Only this module writes
SQL; the rules are in ``catalogue.py`` and ``enrolment.py``.

Full-text search differs by database, with the same meaning: on PostgreSQL two generated
``tsvector`` columns (title and description, and the title alone) with a GIN index; on
SQLite an FTS5 index (``course_search``, Porter stemming) kept by triggers. Both are made
by the migration, so the models here do not name them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    ForeignKey,
    Index,
    Integer,
    Select,
    String,
    Text,
    UniqueConstraint,
    column,
    delete,
    func,
    literal,
    literal_column,
    select,
    table,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from learnmesh.audit import audit_table
from learnmesh.db import UtcDateTime
from learnmesh.eventing.tables import event_tables
from learnmesh.shared_secrets import secrets_table


class Base(DeclarativeBase):
    """The course service's own metadata: its migrations see only its tables."""


ACTIVE = text("archived_at IS NULL")


class CourseRow(Base):
    __tablename__ = "course_courses"
    __table_args__ = (
        # One index per ordering of ListCourses, over the catalogue only (keyset scans).
        Index(
            "ix_course_courses_created",
            "created_at",
            "id",
            sqlite_where=ACTIVE,
            postgresql_where=ACTIVE,
        ),
        Index(
            "ix_course_courses_title",
            "title_key",
            "id",
            sqlite_where=ACTIVE,
            postgresql_where=ACTIVE,
        ),
        Index(
            "ix_course_courses_enrolled",
            "enrollment_count",
            "id",
            sqlite_where=ACTIVE,
            postgresql_where=ACTIVE,
        ),
        Index(
            "ix_course_courses_category",
            "category_key",
            "created_at",
            "id",
            sqlite_where=ACTIVE,
            postgresql_where=ACTIVE,
        ),
    )

    # The FTS5 index's rowid on SQLite (an alias of the table's rowid there, so VACUUM
    # keeps it); unused otherwise.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    instructor_id: Mapped[str] = mapped_column(String(36), index=True)
    title: Mapped[str] = mapped_column(String(200))
    # Lower-case title, compared byte by byte (collation "C" on PostgreSQL) for "title".
    title_key: Mapped[str] = mapped_column(String(800))
    description: Mapped[str] = mapped_column(Text)
    category: Mapped[str] = mapped_column(String(50))
    category_key: Mapped[str] = mapped_column(String(200))
    level: Mapped[str] = mapped_column(String(16))  # "beginner", "intermediate", "advanced"
    lesson_count: Mapped[int] = mapped_column(Integer, default=0)
    enrollment_count: Mapped[int] = mapped_column(Integer, default=0)
    # Set when deleted with students enrolled: out of the catalogue, kept for them.
    archived_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class LessonRow(Base):
    __tablename__ = "course_lessons"
    __table_args__ = (UniqueConstraint("course_id", "position", name="uq_course_lessons_position"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    course_id: Mapped[str] = mapped_column(String(36), ForeignKey("course_courses.id"))
    title: Mapped[str] = mapped_column(String(200))
    content: Mapped[str] = mapped_column(Text)
    position: Mapped[int] = mapped_column(Integer)  # 1, 2, … in the order of creation
    duration_minutes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class EnrollmentRow(Base):
    __tablename__ = "course_enrollments"
    __table_args__ = (UniqueConstraint("course_id", "user_id", name="uq_course_enrollments"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    course_id: Mapped[str] = mapped_column(String(36), ForeignKey("course_courses.id"))
    user_id: Mapped[str] = mapped_column(String(36), index=True)
    enrolled_at: Mapped[datetime] = mapped_column(UtcDateTime)


class CompletionRow(Base):
    __tablename__ = "course_completions"

    enrollment_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("course_enrollments.id"), primary_key=True
    )
    lesson_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("course_lessons.id"), primary_key=True
    )
    completed_at: Mapped[datetime] = mapped_column(UtcDateTime)


class InstructorRow(Base):
    """The last display name the user service gave for an instructor: what reads answer
    with (marked stale) while it cannot be reached."""

    __tablename__ = "course_instructors"

    user_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(200))
    # Set by a user.updated event: ask the user service on the next read, on any replica.
    refresh_due: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


course_audit = audit_table("course_audit", Base.metadata)
events = event_tables("course", Base.metadata)
# Keys every replica shares (learnmesh.shared_secrets): the page-token key.
course_secrets = secrets_table("course_secrets", Base.metadata)
_search = table("course_search", column("rowid"))


def _insert(session: AsyncSession) -> Any:
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


# --- courses ---


async def course(
    session: AsyncSession, course_id: str, *, for_update: bool = False
) -> CourseRow | None:
    query = select(CourseRow).where(CourseRow.id == course_id)
    if for_update:
        query = query.with_for_update()
    row: CourseRow | None = (await session.execute(query)).scalar_one_or_none()
    return row


async def instructor_of(session: AsyncSession, course_id: str) -> str | None:
    found: str | None = (
        await session.execute(select(CourseRow.instructor_id).where(CourseRow.id == course_id))
    ).scalar_one_or_none()
    return found


async def add(session: AsyncSession, row: Any) -> None:
    session.add(row)
    await session.flush()


async def bump(session: AsyncSession, course_id: str, column_name: str, by: int) -> int:
    """Adds ``by`` to the course's counter in one statement (exact under concurrency);
    returns the new value."""
    counter = getattr(CourseRow, column_name)
    value: int = (
        await session.execute(
            update(CourseRow)
            .where(CourseRow.id == course_id)
            .values({counter: counter + by})
            .returning(counter)
        )
    ).scalar_one()
    return value


async def erase(session: AsyncSession, course_id: str) -> None:
    """Deletes a course nobody is enrolled in, with its lessons."""
    await session.execute(delete(LessonRow).where(LessonRow.course_id == course_id))
    await session.execute(delete(CourseRow).where(CourseRow.id == course_id))


async def archive_taught_by(session: AsyncSession, instructor_id: str, now: datetime) -> int:
    result = await session.execute(
        update(CourseRow)
        .where(CourseRow.instructor_id == instructor_id, CourseRow.archived_at.is_(None))
        .values(archived_at=now, updated_at=now)
    )
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass(frozen=True)
class Listed:
    """A course row of a page, with its instructor's last known name (None: never known)."""

    row: CourseRow
    instructor_name: str | None
    refresh_due: bool
    tier: int


# Sort keys of each ordering, all in one direction (so a row-value comparison resumes it).
ORDERINGS: dict[str, tuple[tuple[str, ...], bool]] = {
    "created_at desc": (("created_at", "id"), True),
    "created_at": (("created_at", "id"), False),
    "title": (("title_key", "id"), False),
    "enrollment_count desc": (("enrollment_count", "id"), True),
    "relevance": (("tier", "created_at", "id"), True),
}


def _matching(session: AsyncSession, words: str, *, title_only: bool) -> ColumnElement[bool]:
    """Courses whose title (and description) hold every word of ``words`` (stemmed)."""
    if session.get_bind().dialect.name == "postgresql":
        vector = "title_vector" if title_only else "search_vector"
        query = func.plainto_tsquery(literal_column("'english'"), literal(words))
        matched: ColumnElement[bool] = literal_column(f"course_courses.{vector}").op(
            "@@", is_comparison=True
        )(query)
        return matched
    terms = " ".join(f'"{w}"' for w in words.split())  # words are letters and digits only
    expression = f"title : ({terms})" if title_only else terms
    hits = select(_search.c.rowid).where(
        literal_column("course_search").op("MATCH", is_comparison=True)(literal(expression))
    )
    return CourseRow.seq.in_(hits)


# A SELECT of any columns (SQLAlchemy 2.1 types a Select by the tuple of its columns).
AnySelect = Select[*tuple[Any, ...]]


def _catalogue(session: AsyncSession, tier: int, category_key: str, level: str) -> AnySelect:
    query: AnySelect = (
        select(
            CourseRow,
            InstructorRow.display_name,
            InstructorRow.refresh_due,
            literal(tier).label("tier"),
        )
        .outerjoin(InstructorRow, InstructorRow.user_id == CourseRow.instructor_id)
        .where(CourseRow.archived_at.is_(None))
    )
    if category_key:
        query = query.where(CourseRow.category_key == category_key)
    if level:
        query = query.where(CourseRow.level == level)
    return query


async def _keyset(
    session: AsyncSession, query: AnySelect, ordering: str, limit: int, after: Any
) -> list[Listed]:
    """``query`` in ``ordering`` (without its tier), strictly after ``after``."""
    names, descending = ORDERINGS[ordering]
    keys = [getattr(CourseRow, name) for name in names if name != "tier"]
    if after is not None:
        resume = tuple_(*keys) < tuple_(*after) if descending else tuple_(*keys) > tuple_(*after)
        query = query.where(resume)
    query = query.order_by(*[k.desc() if descending else k.asc() for k in keys]).limit(limit)
    rows = (await session.execute(query)).all()
    return [Listed(r[0], r[1], bool(r[2]), int(r[3])) for r in rows]


async def page(
    session: AsyncSession,
    *,
    ordering: str,
    limit: int,
    after: Sequence[Any] | None = None,
    category_key: str = "",
    level: str = "",
    words: str | None = None,
) -> list[Listed]:
    """Up to ``limit`` catalogue courses in ``ordering``, strictly after ``after`` (the
    last row's sort key values): a keyset query, never OFFSET, so rows inserted meanwhile
    neither shift nor repeat a page. ``words``: only courses holding all of them (an empty
    string matches nothing), with ``tier`` 2 for those holding them in the title.

    By relevance, each tier is a keyset query of its own (title matches, then the rest,
    each newest first) and the second runs only when the first did not fill the page: each
    can walk the created_at index, where one query ordered by tier would sort every match.
    """
    if words == "":
        return []
    if words is None:
        return await _keyset(
            session, _catalogue(session, 1, category_key, level), ordering, limit, after
        )
    matching = _matching(session, words, title_only=False)
    in_title = _matching(session, words, title_only=True)
    if ordering != "relevance":
        query = _catalogue(session, 1, category_key, level).where(matching)
        return await _keyset(session, query, ordering, limit, after)
    after_tier, rest = (after[0], list(after[1:])) if after is not None else (2, None)
    found: list[Listed] = []
    if after_tier >= 2:
        titled = _catalogue(session, 2, category_key, level).where(matching, in_title)
        found = await _keyset(session, titled, ordering, limit, rest if after_tier == 2 else None)
        rest = None
    if len(found) < limit:
        described = _catalogue(session, 1, category_key, level).where(matching, ~in_title)
        found += await _keyset(session, described, ordering, limit - len(found), rest)
    return found


async def with_instructor(session: AsyncSession, course_id: str) -> Listed | None:
    query = (
        select(CourseRow, InstructorRow.display_name, InstructorRow.refresh_due)
        .outerjoin(InstructorRow, InstructorRow.user_id == CourseRow.instructor_id)
        .where(CourseRow.id == course_id)
    )
    found = (await session.execute(query)).first()
    if found is None:
        return None
    return Listed(found[0], found[1], bool(found[2]), 1)


# --- lessons ---


async def lesson(session: AsyncSession, course_id: str, lesson_id: str) -> LessonRow | None:
    query = select(LessonRow).where(LessonRow.id == lesson_id, LessonRow.course_id == course_id)
    row: LessonRow | None = (await session.execute(query)).scalar_one_or_none()
    return row


async def lessons(
    session: AsyncSession, course_id: str, *, limit: int, after_position: int = 0
) -> list[LessonRow]:
    query = (
        select(LessonRow)
        .where(LessonRow.course_id == course_id, LessonRow.position > after_position)
        .order_by(LessonRow.position)
        .limit(limit)
    )
    return list((await session.execute(query)).scalars())


# --- enrolments and progress ---


async def enrollment(session: AsyncSession, course_id: str, user_id: str) -> EnrollmentRow | None:
    query = select(EnrollmentRow).where(
        EnrollmentRow.course_id == course_id, EnrollmentRow.user_id == user_id
    )
    row: EnrollmentRow | None = (await session.execute(query)).scalar_one_or_none()
    return row


async def add_enrollment(session: AsyncSession, row: EnrollmentRow) -> bool:
    """Inserts the enrolment unless the user is enrolled already; True when inserted."""
    statement = (
        _insert(session)(EnrollmentRow)
        .values(
            id=row.id, course_id=row.course_id, user_id=row.user_id, enrolled_at=row.enrolled_at
        )
        .on_conflict_do_nothing(index_elements=["course_id", "user_id"])
        .returning(EnrollmentRow.id)
    )
    return (await session.execute(statement)).scalar_one_or_none() is not None


async def add_completion(
    session: AsyncSession, enrollment_id: str, lesson_id: str, at: datetime
) -> bool:
    """Records the lesson as completed unless it was; True when recorded now."""
    statement = (
        _insert(session)(CompletionRow)
        .values(enrollment_id=enrollment_id, lesson_id=lesson_id, completed_at=at)
        .on_conflict_do_nothing(index_elements=["enrollment_id", "lesson_id"])
        .returning(CompletionRow.lesson_id)
    )
    return (await session.execute(statement)).scalar_one_or_none() is not None


@dataclass(frozen=True)
class Completed:
    lesson_ids: list[str]  # in lesson order
    last_at: datetime | None


async def completed(session: AsyncSession, enrollment_id: str) -> Completed:
    query = (
        select(CompletionRow.lesson_id, CompletionRow.completed_at)
        .join(LessonRow, LessonRow.id == CompletionRow.lesson_id)
        .where(CompletionRow.enrollment_id == enrollment_id)
        .order_by(LessonRow.position)
    )
    rows = (await session.execute(query)).all()
    return Completed([r[0] for r in rows], max((r[1] for r in rows), default=None))


async def is_enrolled(session: AsyncSession, course_id: str, user_id: str) -> bool:
    return await enrollment(session, course_id, user_id) is not None


async def forget_student(session: AsyncSession, user_id: str) -> list[str]:
    """Deletes the user's enrolments and completed lessons, lowering each course's count;
    returns the courses they were enrolled in."""
    mine = select(EnrollmentRow.id).where(EnrollmentRow.user_id == user_id)
    await session.execute(delete(CompletionRow).where(CompletionRow.enrollment_id.in_(mine)))
    courses = list(
        (
            await session.execute(
                delete(EnrollmentRow)
                .where(EnrollmentRow.user_id == user_id)
                .returning(EnrollmentRow.course_id)
            )
        ).scalars()
    )
    if courses:
        await session.execute(
            update(CourseRow)
            .where(CourseRow.id.in_(courses))
            .values(enrollment_count=CourseRow.enrollment_count - 1)
        )
    return courses


# --- instructors ---


async def remember_instructors(session: AsyncSession, names: dict[str, str], now: datetime) -> None:
    """Stores the names the user service just gave (clearing any refresh due)."""
    for user_id, name in sorted(names.items()):  # one lock order for every caller
        statement = _insert(session)(InstructorRow).values(
            user_id=user_id, display_name=name, refresh_due=False, updated_at=now
        )
        statement = statement.on_conflict_do_update(
            index_elements=["user_id"],
            set_={"display_name": name, "refresh_due": False, "updated_at": now},
        )
        await session.execute(statement)


async def mark_refresh_due(session: AsyncSession, user_id: str) -> None:
    await session.execute(
        update(InstructorRow).where(InstructorRow.user_id == user_id).values(refresh_due=True)
    )
