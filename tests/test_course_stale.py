"""The course service in a server of its own, reaching auth and user in another over mTLS:
with the user service stopped, reads still answer, with the instructors' last known names
marked stale, at once (the channel is no longer connected, so the cached names are not
taken as fresh) and after a restart of the course service (the names are stored)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from learnmesh.auth.v1 import auth_pb2
from learnmesh.course.v1 import course_pb2, course_pb2_grpc
from tests.conftest import PASSWORD, bearer, mesh_settings, running_mesh, scratch_database
from tests.support.mesh import new_email

DESCRIPTION = "Everything about the stars and planets."


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_reads_answer_stale_names_while_the_user_service_is_down(
    backend: str, tmp_path: Path
) -> None:
    for part in ("a", "b"):
        (tmp_path / part).mkdir()
    async with (
        scratch_database(backend, tmp_path / "a") as users_url,
        scratch_database(backend, tmp_path / "b") as courses_url,
    ):
        peers_cm = running_mesh(mesh_settings(tmp_path, users_url), ("auth", "user"))
        peers = await peers_cm.__aenter__()
        peers_open = True
        try:
            email = new_email("astronomer")
            await peers.register(email, name="Vera Rubin")
            await peers.promote(email, "instructor")
            login = await peers.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
            settings = replace(
                mesh_settings(tmp_path, courses_url),
                auth_address=peers.server.address,
                user_address=peers.server.address,
            )
            async with running_mesh(settings, ("course",)) as courses:
                stub = course_pb2_grpc.CourseServiceStub(courses.channel)
                created = await stub.CreateCourse(
                    course_pb2.CreateCourseRequest(
                        title="Introduction to astronomy",
                        description=DESCRIPTION,
                        category="Science",
                        level=course_pb2.LEVEL_BEGINNER,
                    ),
                    metadata=bearer(login.access_token),
                )
                course_id = created.course.id
                fresh = (
                    await stub.GetCourse(course_pb2.GetCourseRequest(course_id=course_id))
                ).course
                assert (fresh.instructor.display_name, fresh.instructor.stale) == (
                    "Vera Rubin",
                    False,
                )

                await peers_cm.__aexit__(None, None, None)
                peers_open = False

                got = (
                    await stub.GetCourse(course_pb2.GetCourseRequest(course_id=course_id))
                ).course
                assert got.instructor.display_name == "Vera Rubin"
                assert got.instructor.stale
                listed = await stub.ListCourses(course_pb2.ListCoursesRequest(search="astronomy"))
                assert [(c.id, c.instructor.stale) for c in listed.courses] == [(course_id, True)]

            # A new course process knows nothing in memory: the stored name answers.
            async with running_mesh(settings, ("course",)) as restarted:
                stub = course_pb2_grpc.CourseServiceStub(restarted.channel)
                got = (
                    await stub.GetCourse(course_pb2.GetCourseRequest(course_id=course_id))
                ).course
                assert (got.instructor.display_name, got.instructor.stale) == ("Vera Rubin", True)
        finally:
            if peers_open:
                await peers_cm.__aexit__(None, None, None)
