"""The test-support helpers hold up when what they drive misbehaves: a server that dies
before it is ready, a test that fails while its server runs, a server whose error details
contradict its status."""

from __future__ import annotations

import json
import sys
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status

from learnmesh.course.v1 import course_pb2, course_pb2_grpc
from tests.support.doubles import COURSE_ID, CourseDouble
from tests.support.processes import ServerProcess, python_module, server_process
from tests.support.servers import serve
from tests.support.status import status_of

GET = course_pb2.GetCourseRequest(course_id=COURSE_ID)


async def test_a_server_that_dies_before_it_is_ready_fails_with_its_output() -> None:
    command = [sys.executable, "-c", "import sys; print('starting'); sys.exit('no port: bye')"]
    with pytest.raises(AssertionError, match=r"(?s)exited before it was ready.*no port: bye"):
        async with server_process(command):
            pass


async def call_then_fail(started: list[ServerProcess]) -> None:
    """Uses a B process (one scripted failure, then answers), then fails as a test can."""
    command = python_module("tests.support.double_process", "--fail-times", "1")
    async with server_process(command) as b:
        started.append(b)
        async with aio.insecure_channel(b.address) as channel:
            stub = course_pb2_grpc.CourseServiceStub(channel)
            with pytest.raises(aio.AioRpcError) as err:
                await stub.GetCourse(GET, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert (await stub.GetCourse(GET, timeout=10)).course.id == COURSE_ID
            stats = await stub.ListCourses(course_pb2.ListCoursesRequest(), timeout=10)
            assert json.loads(stats.courses[0].title)["calls"] == 2
        raise RuntimeError("the test failed")


async def test_the_server_is_killed_even_when_the_test_fails() -> None:
    started: list[ServerProcess] = []
    with pytest.raises(RuntimeError, match="the test failed"):
        await call_then_fail(started)
    assert started[0].proc.returncode == -9  # SIGKILL: not left running


class Contradicting(CourseDouble):
    """Sends rich details whose code and message disagree with the call's status."""

    async def GetCourse(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        lie = status_pb2.Status(code=code_pb2.INTERNAL, message="something else")
        await context.abort(
            grpc.StatusCode.NOT_FOUND,
            "no such course",
            rpc_status.to_status(lie).trailing_metadata,
        )


async def test_details_that_contradict_the_status_are_not_believed() -> None:
    served = await serve([], course=Contradicting())
    try:
        async with aio.insecure_channel(served.address) as channel:
            with pytest.raises(aio.AioRpcError) as err:
                await course_pb2_grpc.CourseServiceStub(channel).GetCourse(GET, timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ValueError, match="doesn't match status code"):
            status_of(err.value)
    finally:
        await served.stop()
