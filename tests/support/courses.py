"""Helpers of the course tests: a mesh with the course service, instructors, courses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from learnmesh.auth.v1 import auth_pb2
from learnmesh.course.v1 import course_pb2, course_pb2_grpc
from tests.conftest import PASSWORD, Mesh, bearer, mesh_settings, running_mesh, scratch_database
from tests.support.mesh import new_email

SERVICES = ("auth", "user", "course")
DESCRIPTION = "A course about many things, described at some length."


@dataclass(frozen=True)
class Account:
    user_id: str
    email: str
    metadata: tuple[tuple[str, str], ...]


def courses(mesh: Mesh) -> course_pb2_grpc.CourseServiceStub:
    return course_pb2_grpc.CourseServiceStub(mesh.channel)


async def course_mesh(backend: str, tmp: Path) -> AsyncIterator[Mesh]:
    """Auth, user and course in one process on ``backend`` (sqlite or postgres)."""
    async with (
        scratch_database(backend, tmp) as url,
        running_mesh(mesh_settings(tmp, url), SERVICES) as mesh,
    ):
        yield mesh


async def account(mesh: Mesh, name: str = "Stu Dent", role: str = "") -> Account:
    """A registered user; with ``role``, promoted as an operator does and signed in again
    (roles reach the access token at sign-in)."""
    email = new_email(role or "student")
    registered = await mesh.register(email, name=name)
    token = registered.access_token
    if role:
        await mesh.promote(email, role)
        login = await mesh.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
        token = login.access_token
    return Account(registered.user.id, email, bearer(token))


async def create_course(
    mesh: Mesh,
    owner: Account,
    title: str,
    description: str = DESCRIPTION,
    category: str = "Programming",
    level: course_pb2.Level.ValueType = course_pb2.LEVEL_BEGINNER,
) -> course_pb2.Course:
    response = await courses(mesh).CreateCourse(
        course_pb2.CreateCourseRequest(
            title=title, description=description, category=category, level=level
        ),
        metadata=owner.metadata,
    )
    return response.course
