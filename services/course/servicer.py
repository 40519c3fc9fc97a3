"""CourseService over gRPC: requests become calls of the rules, results become protos.

No rules and no SQL here. The interceptors have already verified the caller against the
method's policy (the course's owner for UpdateCourse, DeleteCourse and CreateLesson) and
validated the request, so nothing is re-checked.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf import timestamp_pb2
from grpc import aio

from learnmesh.course.v1 import course_pb2, course_pb2_grpc
from learnmesh.kernel import principal
from services.course.catalogue import Catalogue, Course, CourseFields, Lesson
from services.course.enrolment import Enrolment, Progress
from services.course.read_cache import ReadCache

LEVEL_PREFIX = "LEVEL_"


def level_name(value: int) -> str:
    """LEVEL_BEGINNER → "beginner"; unset or unknown → ""."""
    if value == 0:
        return ""
    try:
        return course_pb2.Level.Name(value).removeprefix(LEVEL_PREFIX).lower()  # type: ignore[arg-type]
    except ValueError:
        return ""


def level_value(name: str) -> course_pb2.Level.ValueType:
    try:
        return course_pb2.Level.Value(LEVEL_PREFIX + name.upper())
    except ValueError:
        return course_pb2.LEVEL_UNSPECIFIED


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def course_proto(course: Course) -> course_pb2.Course:
    return course_pb2.Course(
        id=course.id,
        title=course.title,
        description=course.description,
        category=course.category,
        level=level_value(course.level),
        instructor=course_pb2.Instructor(
            id=course.instructor.id,
            display_name=course.instructor.display_name,
            stale=course.instructor.stale,
        ),
        lesson_count=course.lesson_count,
        enrollment_count=course.enrollment_count,
        created_at=timestamp(course.created_at),
        updated_at=timestamp(course.updated_at),
        archived=course.archived,
    )


def lesson_proto(lesson: Lesson) -> course_pb2.Lesson:
    return course_pb2.Lesson(
        id=lesson.id,
        course_id=lesson.course_id,
        title=lesson.title,
        content=lesson.content,
        position=lesson.position,
        duration_minutes=lesson.duration_minutes,
        created_at=timestamp(lesson.created_at),
    )


def progress_proto(progress: Progress) -> course_pb2.Progress:
    return course_pb2.Progress(
        course_id=progress.course_id,
        completed_lessons=progress.completed_lessons,
        total_lessons=progress.total_lessons,
        completed_lesson_ids=progress.completed_lesson_ids,
        updated_at=timestamp(progress.updated_at),
        percent=progress.percent,
    )


class CourseServicer(course_pb2_grpc.CourseServiceServicer):
    def __init__(
        self,
        catalogue: Catalogue,
        enrolment: Enrolment,
        consumes: Any,
        recent: ReadCache[course_pb2.GetCourseResponse],
    ) -> None:
        self.catalogue = catalogue
        self.enrolment = enrolment
        # The service's event handlers (learnmesh.eventing.handlers.Handlers).
        self.consumes = consumes
        # GetCourse's recent answers (read_cache.py); the rules drop what they change.
        self.recent = recent

    async def ListCourses(
        self, request: course_pb2.ListCoursesRequest, context: aio.ServicerContext[Any, Any]
    ) -> course_pb2.ListCoursesResponse:
        page = await self.catalogue.page(
            page_size=request.page_size if request.HasField("page_size") else None,
            page_token=request.page_token,
            category=request.category,
            level=level_name(request.level),
            search=request.search,
            order_by=request.order_by,
        )
        return course_pb2.ListCoursesResponse(
            courses=[course_proto(c) for c in page.courses], next_page_token=page.next_page_token
        )

    async def GetCourse(
        self, request: course_pb2.GetCourseRequest, context: aio.ServicerContext[Any, Any]
    ) -> course_pb2.GetCourseResponse:
        kept = self.recent.get(request.course_id)
        # Kept answers hold fresh names: with the user service gone, answer afresh (stale).
        if kept is not None and self.catalogue.instructors.connected():
            return kept
        mark = self.recent.mark()
        course = await self.catalogue.get(request.course_id, principal.current_or_none())
        answer = course_pb2.GetCourseResponse(course=course_proto(course))
        if not course.archived and not course.instructor.stale:
            self.recent.put(request.course_id, answer, mark)
        return answer

    async def CreateCourse(
        self, request: course_pb2.CreateCourseRequest, context: aio.ServicerContext[Any, Any]
    ) -> course_pb2.CreateCourseResponse:
        fields = CourseFields(
            title=request.title,
            description=request.description,
            category=request.category,
            level=level_name(request.level),
        )
        course = await self.catalogue.create(principal.current().user_id, fields)
        return course_pb2.CreateCourseResponse(course=course_proto(course))

    async def UpdateCourse(
        self, request: course_pb2.UpdateCourseRequest, context: aio.ServicerContext[Any, Any]
    ) -> course_pb2.UpdateCourseResponse:
        update = request.course
        fields = CourseFields(
            title=update.title,
            description=update.description,
            category=update.category,
            level=level_name(update.level),
        )
        course = await self.catalogue.update(request.course_id, fields, request.update_mask.paths)
        return course_pb2.UpdateCourseResponse(course=course_proto(course))

    async def DeleteCourse(
        self, request: course_pb2.DeleteCourseRequest, context: aio.ServicerContext[Any, Any]
    ) -> course_pb2.DeleteCourseResponse:
        await self.catalogue.delete(request.course_id, actor=principal.current().user_id)
        return course_pb2.DeleteCourseResponse()

    async def ListLessons(
        self, request: course_pb2.ListLessonsRequest, context: aio.ServicerContext[Any, Any]
    ) -> course_pb2.ListLessonsResponse:
        page = await self.catalogue.lessons(
            request.course_id,
            page_size=request.page_size if request.HasField("page_size") else None,
            page_token=request.page_token,
            viewer=principal.current_or_none(),
        )
        return course_pb2.ListLessonsResponse(
            lessons=[lesson_proto(lesson) for lesson in page.lessons],
            next_page_token=page.next_page_token,
        )

    async def CreateLesson(
        self, request: course_pb2.CreateLessonRequest, context: aio.ServicerContext[Any, Any]
    ) -> course_pb2.CreateLessonResponse:
        lesson = await self.catalogue.create_lesson(
            request.course_id, request.title, request.content, request.duration_minutes
        )
        return course_pb2.CreateLessonResponse(lesson=lesson_proto(lesson))

    async def Enroll(
        self, request: course_pb2.EnrollRequest, context: aio.ServicerContext[Any, Any]
    ) -> course_pb2.EnrollResponse:
        enrolled = await self.enrolment.enroll(request.course_id, principal.current().user_id)
        return course_pb2.EnrollResponse(
            enrollment_id=enrolled.enrollment_id, enrolled_at=timestamp(enrolled.enrolled_at)
        )

    async def CompleteLesson(
        self, request: course_pb2.CompleteLessonRequest, context: aio.ServicerContext[Any, Any]
    ) -> course_pb2.CompleteLessonResponse:
        progress = await self.enrolment.complete(
            request.course_id, request.lesson_id, principal.current().user_id
        )
        return course_pb2.CompleteLessonResponse(progress=progress_proto(progress))

    async def GetProgress(
        self, request: course_pb2.GetProgressRequest, context: aio.ServicerContext[Any, Any]
    ) -> course_pb2.GetProgressResponse:
        progress = await self.enrolment.progress(request.course_id, principal.current().user_id)
        return course_pb2.GetProgressResponse(progress=progress_proto(progress))
