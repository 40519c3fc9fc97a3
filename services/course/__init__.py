"""The course service: courses, lessons, enrolments and progress
(learnmesh.course.v1.CourseService).

Exports ``SERVICE`` for the runtime; the servicer and its dependencies load only when the
service is built.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from learnmesh.course.v1 import course_pb2_grpc
from learnmesh.service import ServiceDefinition

if TYPE_CHECKING:
    from learnmesh.eventing.handlers import Handlers
    from learnmesh.service import Runtime
    from services.course.servicer import CourseServicer

FULL_NAME = "learnmesh.course.v1.CourseService"
# The ACCESS_OWNER methods: their course's instructor (or an admin) may call them.
OWNED = ("UpdateCourse", "DeleteCourse", "CreateLesson")


async def create(runtime: Runtime) -> CourseServicer:
    """Builds the servicer (imported here so that importing the package stays light)."""
    from learnmesh.page_tokens import PageTokens
    from learnmesh.shared_secrets import PAGE_TOKENS, shared_secret
    from services.course import store, user_events
    from services.course.catalogue import Catalogue
    from services.course.enrolment import Enrolment
    from services.course.instructors import Instructors
    from services.course.read_cache import ReadCache
    from services.course.servicer import CourseServicer

    async with runtime.db.transaction() as session:
        key = await shared_secret(session, store.course_secrets, PAGE_TOKENS)
    settings = runtime.settings.course
    instructors = Instructors(runtime.db, runtime.clients, settings)
    recent: ReadCache[Any] = ReadCache(settings.read_cache_ttl)
    catalogue = Catalogue(runtime.db, instructors, PageTokens(key), PageTokens(key), recent)
    return CourseServicer(
        catalogue,
        Enrolment(runtime.db, recent),
        user_events.consumed(instructors, recent),
        recent,
    )


def _owner_resolvers(servicer: Any) -> Mapping[str, Callable[[Any], Awaitable[str | None]]]:
    async def owner(request: Any) -> str | None:
        found: str | None = await servicer.catalogue.owner_of(request.course_id)
        return found

    return {f"/{FULL_NAME}/{method}": owner for method in OWNED}


def _consumes(servicer: Any) -> Handlers:
    handlers: Handlers = servicer.consumes
    return handlers


SERVICE = ServiceDefinition(
    name="course",
    full_name=FULL_NAME,
    add_to_server=course_pb2_grpc.add_CourseServiceServicer_to_server,
    create=create,
    migrations=Path(__file__).resolve().parent / "migrations",
    owner_resolvers=_owner_resolvers,
    audit_table="course_audit",
    event_tables="course",
    consumes=_consumes,
)
