"""CourseService over real channels (mTLS) on SQLite and PostgreSQL: the catalogue, owners,
lessons, enrolment and progress, archiving, exact counts under concurrency, bad input,
the events it emits and the user service's events it consumes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import text

from learnmesh.course.v1 import course_pb2
from learnmesh.events.v1 import events_pb2
from learnmesh.user.v1 import user_pb2
from tests.conftest import ADMIN_EMAIL, Mesh, bearer
from tests.support.courses import Account, account, course_mesh, courses, create_course
from tests.support.mesh import data_of, outbox_events, wait_until
from tests.support.status import error_reason, refused, violations


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
async def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    tmp = tmp_path_factory.mktemp(f"course-{request.param}")
    async for m in course_mesh(request.param, tmp):
        yield m


@pytest.fixture(scope="module")
async def teacher(mesh: Mesh) -> Account:
    return await account(mesh, "Ada Teacher", role="instructor")


@pytest.fixture(scope="module")
async def admin(mesh: Mesh) -> Account:
    registered = await mesh.register(ADMIN_EMAIL)
    return Account(registered.user.id, ADMIN_EMAIL, bearer(registered.access_token))


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def add_lessons(mesh: Mesh, owner: Account, course_id: str, count: int) -> list[str]:
    ids = []
    for i in range(count):
        created = await courses(mesh).CreateLesson(
            course_pb2.CreateLessonRequest(
                course_id=course_id, title=f"Lesson {i + 1}", content="Text.", duration_minutes=10
            ),
            metadata=owner.metadata,
        )
        ids.append(created.lesson.id)
    return ids


async def test_the_course_flow_from_creation_to_progress(mesh: Mesh, teacher: Account) -> None:
    stub = courses(mesh)
    course = await create_course(
        mesh, teacher, "Photosynthesis explained", "How green plants turn light into sugar."
    )
    assert course.instructor.id == teacher.user_id
    assert course.instructor.display_name == "Ada Teacher"
    assert not course.instructor.stale
    lessons = await add_lessons(mesh, teacher, course.id, 3)

    listed = await stub.ListLessons(course_pb2.ListLessonsRequest(course_id=course.id))
    assert [lesson.position for lesson in listed.lessons] == [1, 2, 3]
    assert [lesson.id for lesson in listed.lessons] == lessons

    student = await account(mesh)
    found = await stub.ListCourses(course_pb2.ListCoursesRequest(search="plants light"))
    assert [c.id for c in found.courses] == [course.id]

    first = await stub.Enroll(
        course_pb2.EnrollRequest(course_id=course.id), metadata=student.metadata
    )
    again = await stub.Enroll(
        course_pb2.EnrollRequest(course_id=course.id), metadata=student.metadata
    )
    assert again.enrollment_id == first.enrollment_id
    assert again.enrolled_at == first.enrolled_at
    got = (await stub.GetCourse(course_pb2.GetCourseRequest(course_id=course.id))).course
    assert (got.enrollment_count, got.lesson_count) == (1, 3)

    done = await stub.CompleteLesson(
        course_pb2.CompleteLessonRequest(course_id=course.id, lesson_id=lessons[1]),
        metadata=student.metadata,
    )
    twice = await stub.CompleteLesson(
        course_pb2.CompleteLessonRequest(course_id=course.id, lesson_id=lessons[1]),
        metadata=student.metadata,
    )
    assert done.progress.completed_lessons == twice.progress.completed_lessons == 1
    await stub.CompleteLesson(
        course_pb2.CompleteLessonRequest(course_id=course.id, lesson_id=lessons[0]),
        metadata=student.metadata,
    )
    progress = (
        await stub.GetProgress(
            course_pb2.GetProgressRequest(course_id=course.id), metadata=student.metadata
        )
    ).progress
    assert (progress.completed_lessons, progress.total_lessons) == (2, 3)
    assert list(progress.completed_lesson_ids) == lessons[:2]  # in lesson order
    assert progress.percent == pytest.approx(200 / 3)

    # The outbox holds one event per change, the repeated calls none.
    about_course = await outbox_events(mesh, "course", course.id)
    assert [e.type for e in about_course] == ["course.created", "enrollment.created"]
    enrolled = data_of(about_course[1], events_pb2.EnrollmentCreated)
    assert (enrolled.user_id, enrolled.enrollment_id) == (student.user_id, first.enrollment_id)
    about_student = await outbox_events(mesh, "course", student.user_id)
    updates = [data_of(e, events_pb2.ProgressUpdated) for e in about_student]
    assert [(u.completed_lessons, u.total_lessons) for u in updates] == [(1, 3), (2, 3)]


async def test_only_the_instructor_or_an_admin_changes_a_course(
    mesh: Mesh, teacher: Account, admin: Account
) -> None:
    stub = courses(mesh)
    course = await create_course(mesh, teacher, "Owned course number one")
    other_teacher = await account(mesh, "Other Teacher", role="instructor")
    student = await account(mesh)
    update = course_pb2.UpdateCourseRequest(
        course_id=course.id,
        course=course_pb2.CourseUpdate(title="Taken over"),
        update_mask=mask("title"),
    )
    lesson = course_pb2.CreateLessonRequest(course_id=course.id, title="Intruder", content="x")
    delete = course_pb2.DeleteCourseRequest(course_id=course.id)
    for intruder in (other_teacher, student):
        await refused(
            stub.UpdateCourse(update, metadata=intruder.metadata), grpc.StatusCode.PERMISSION_DENIED
        )
        await refused(
            stub.CreateLesson(lesson, metadata=intruder.metadata), grpc.StatusCode.PERMISSION_DENIED
        )
        await refused(
            stub.DeleteCourse(delete, metadata=intruder.metadata), grpc.StatusCode.PERMISSION_DENIED
        )
    # Students may not create courses at all.
    await refused(
        stub.CreateCourse(
            course_pb2.CreateCourseRequest(
                title="Student course",
                description="x" * 30,
                category="Misc",
                level=course_pb2.LEVEL_ADVANCED,
            ),
            metadata=student.metadata,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    unchanged = (await stub.GetCourse(course_pb2.GetCourseRequest(course_id=course.id))).course
    assert unchanged.title == "Owned course number one"
    assert unchanged.lesson_count == 0

    mine = await stub.UpdateCourse(
        course_pb2.UpdateCourseRequest(
            course_id=course.id,
            course=course_pb2.CourseUpdate(title="Owned course renamed", category="Ignored"),
            update_mask=mask("title"),
        ),
        metadata=teacher.metadata,
    )
    assert (mine.course.title, mine.course.category) == ("Owned course renamed", "Programming")
    by_admin = await stub.UpdateCourse(
        course_pb2.UpdateCourseRequest(
            course_id=course.id,
            course=course_pb2.CourseUpdate(level=course_pb2.LEVEL_ADVANCED),
            update_mask=mask("level"),
        ),
        metadata=admin.metadata,
    )
    assert by_admin.course.level == course_pb2.LEVEL_ADVANCED
    assert by_admin.course.title == "Owned course renamed"
    await stub.DeleteCourse(delete, metadata=admin.metadata)
    await refused(
        stub.GetCourse(course_pb2.GetCourseRequest(course_id=course.id)), grpc.StatusCode.NOT_FOUND
    )


async def test_a_course_with_students_is_archived_and_they_keep_their_progress(
    mesh: Mesh, teacher: Account
) -> None:
    stub = courses(mesh)
    course = await create_course(mesh, teacher, "Archived with students")
    [lesson] = await add_lessons(mesh, teacher, course.id, 1)
    student = await account(mesh)
    await stub.Enroll(course_pb2.EnrollRequest(course_id=course.id), metadata=student.metadata)
    await stub.CompleteLesson(
        course_pb2.CompleteLessonRequest(course_id=course.id, lesson_id=lesson),
        metadata=student.metadata,
    )
    delete = course_pb2.DeleteCourseRequest(course_id=course.id)
    await stub.DeleteCourse(delete, metadata=teacher.metadata)
    await stub.DeleteCourse(delete, metadata=teacher.metadata)  # again: nothing changes

    catalogue = await stub.ListCourses(course_pb2.ListCoursesRequest(search="archived students"))
    assert course.id not in [c.id for c in catalogue.courses]
    await refused(
        stub.GetCourse(course_pb2.GetCourseRequest(course_id=course.id)), grpc.StatusCode.NOT_FOUND
    )
    outsider = await account(mesh)
    await refused(
        stub.GetCourse(
            course_pb2.GetCourseRequest(course_id=course.id), metadata=outsider.metadata
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    seen = await stub.GetCourse(
        course_pb2.GetCourseRequest(course_id=course.id), metadata=student.metadata
    )
    assert seen.course.archived
    progress = await stub.GetProgress(
        course_pb2.GetProgressRequest(course_id=course.id), metadata=student.metadata
    )
    assert (progress.progress.completed_lessons, progress.progress.total_lessons) == (1, 1)
    lessons = await stub.ListLessons(
        course_pb2.ListLessonsRequest(course_id=course.id), metadata=student.metadata
    )
    assert [x.id for x in lessons.lessons] == [lesson]
    err = await refused(
        stub.Enroll(course_pb2.EnrollRequest(course_id=course.id), metadata=outsider.metadata),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error_reason(err) == "COURSE_ARCHIVED"
    # The enrolled student's Enroll is still answered with their enrolment.
    await stub.Enroll(course_pb2.EnrollRequest(course_id=course.id), metadata=student.metadata)


async def test_counts_stay_exact_under_concurrent_calls(mesh: Mesh, teacher: Account) -> None:
    stub = courses(mesh)
    course = await create_course(mesh, teacher, "Popular course at launch")
    students = await asyncio.gather(*(account(mesh) for _ in range(12)))
    enrolments = await asyncio.gather(
        *(
            stub.Enroll(course_pb2.EnrollRequest(course_id=course.id), metadata=s.metadata)
            for s in students
            for _ in range(3)  # each student three times at once
        )
    )
    by_student: dict[str, set[str]] = {}
    for i, enrolled in enumerate(enrolments):
        by_student.setdefault(students[i // 3].user_id, set()).add(enrolled.enrollment_id)
    assert all(len(ids) == 1 for ids in by_student.values())
    lessons = await asyncio.gather(
        *(
            stub.CreateLesson(
                course_pb2.CreateLessonRequest(course_id=course.id, title=f"Part {i}", content="x"),
                metadata=teacher.metadata,
            )
            for i in range(8)
        )
    )
    assert sorted(r.lesson.position for r in lessons) == list(range(1, 9))
    got = (await stub.GetCourse(course_pb2.GetCourseRequest(course_id=course.id))).course
    assert (got.enrollment_count, got.lesson_count) == (12, 8)
    async with mesh.runtime.db.transaction() as session:
        rows = await session.scalar(
            text("SELECT count(*) FROM course_enrollments WHERE course_id = :c"), {"c": course.id}
        )
    assert rows == 12
    created = [
        e for e in await outbox_events(mesh, "course", course.id) if e.type == "enrollment.created"
    ]
    assert len(created) == 12


async def test_bad_input_is_refused_naming_the_field(mesh: Mesh, teacher: Account) -> None:
    stub = courses(mesh)
    err = await refused(
        stub.GetCourse(course_pb2.GetCourseRequest(course_id="not-a-uuid")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "course_id" in violations(err)
    err = await refused(
        stub.ListCourses(course_pb2.ListCoursesRequest(page_size=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "page_size" in violations(err)
    err = await refused(
        stub.ListCourses(course_pb2.ListCoursesRequest(order_by="price")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "order_by" in violations(err)
    for forged in ("bm90IGEgdG9rZW4", "WzEsMl0.AAAAAAAAAAAAAAAAAAAAAA", "x.y", "."):
        err = await refused(
            stub.ListCourses(course_pb2.ListCoursesRequest(page_token=forged)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "page_token" in violations(err)
    # Owner-checked methods refuse a bad id before looking for its owner, for anyone.
    student = await account(mesh)
    err = await refused(
        stub.UpdateCourse(
            course_pb2.UpdateCourseRequest(
                course_id="1; DROP TABLE course_courses",
                course=course_pb2.CourseUpdate(title="Whatever title"),
                update_mask=mask("title"),
            ),
            metadata=student.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "course_id" in violations(err)
    err = await refused(
        stub.CreateCourse(
            course_pb2.CreateCourseRequest(
                title="Tiny", description="short", category="", level=course_pb2.LEVEL_UNSPECIFIED
            ),
            metadata=teacher.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert {"title", "description", "category", "level"} <= set(violations(err))
    course = await create_course(mesh, teacher, "Masked updates only")
    err = await refused(
        stub.UpdateCourse(
            course_pb2.UpdateCourseRequest(
                course_id=course.id,
                course=course_pb2.CourseUpdate(),
                update_mask=mask("title", "owner"),
            ),
            metadata=teacher.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "update_mask" in violations(err)
    err = await refused(
        stub.UpdateCourse(
            course_pb2.UpdateCourseRequest(
                course_id=course.id,
                course=course_pb2.CourseUpdate(),
                update_mask=mask("title", "level"),
            ),
            metadata=teacher.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert {"course.title", "course.level"} <= set(violations(err))
    await refused(
        stub.GetCourse(
            course_pb2.GetCourseRequest(course_id="00000000-0000-4000-8000-000000000000")
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await refused(
        stub.UpdateCourse(
            course_pb2.UpdateCourseRequest(
                course_id="00000000-0000-4000-8000-000000000000",
                course=course_pb2.CourseUpdate(title="Nothing here"),
                update_mask=mask("title"),
            ),
            metadata=teacher.metadata,
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    student = await account(mesh)
    [lesson] = await add_lessons(mesh, teacher, course.id, 1)
    err = await refused(
        stub.CompleteLesson(
            course_pb2.CompleteLessonRequest(course_id=course.id, lesson_id=lesson),
            metadata=student.metadata,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error_reason(err) == "NOT_ENROLLED"
    await stub.Enroll(course_pb2.EnrollRequest(course_id=course.id), metadata=student.metadata)
    other = await create_course(mesh, teacher, "Another course entirely")
    [foreign] = await add_lessons(mesh, teacher, other.id, 1)
    await refused(
        stub.CompleteLesson(
            course_pb2.CompleteLessonRequest(course_id=course.id, lesson_id=foreign),
            metadata=student.metadata,
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await refused(
        stub.Enroll(course_pb2.EnrollRequest(course_id=course.id)), grpc.StatusCode.UNAUTHENTICATED
    )


async def test_user_events_refresh_names_archive_courses_and_remove_enrolments(
    mesh: Mesh, admin: Account
) -> None:
    stub = courses(mesh)
    leaving = await account(mesh, "Leaving Teacher", role="instructor")
    course = await create_course(mesh, leaving, "Taught by someone leaving")
    staying = await account(mesh, "Staying Teacher", role="instructor")
    kept = await create_course(mesh, staying, "Taught by someone staying")
    student = await account(mesh)
    for c in (course, kept):
        await stub.Enroll(course_pb2.EnrollRequest(course_id=c.id), metadata=student.metadata)

    await mesh.user.UpdateMe(
        user_pb2.UpdateMeRequest(
            profile=user_pb2.ProfileUpdate(display_name="Renamed Teacher"),
            update_mask=mask("display_name"),
        ),
        metadata=leaving.metadata,
    )

    async def renamed() -> bool:
        got = await stub.GetCourse(course_pb2.GetCourseRequest(course_id=course.id))
        return got.course.instructor.display_name == "Renamed Teacher"

    await wait_until(renamed)  # user.updated marked the name due: no waiting for the TTL

    await mesh.user.DeleteUser(
        user_pb2.DeleteUserRequest(user_id=leaving.user_id), metadata=admin.metadata
    )

    async def archived() -> bool:
        got = await stub.GetCourse(
            course_pb2.GetCourseRequest(course_id=course.id), metadata=admin.metadata
        )
        return got.course.archived

    await wait_until(archived)
    got = (
        await stub.GetCourse(
            course_pb2.GetCourseRequest(course_id=course.id), metadata=admin.metadata
        )
    ).course
    assert got.instructor.display_name == "Renamed Teacher"  # the last name known

    await mesh.user.DeleteUser(
        user_pb2.DeleteUserRequest(user_id=student.user_id), metadata=admin.metadata
    )

    async def unenrolled() -> bool:
        got = await stub.GetCourse(course_pb2.GetCourseRequest(course_id=kept.id))
        return got.course.enrollment_count == 0

    await wait_until(unenrolled)
    async with mesh.runtime.db.transaction() as session:
        left = await session.scalar(
            text("SELECT count(*) FROM course_enrollments WHERE user_id = :u"),
            {"u": student.user_id},
        )
    assert left == 0
