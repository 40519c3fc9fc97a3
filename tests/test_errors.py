"""Error mapping: whatever a handler raises, the caller gets a status it can act on and
nothing from inside the process (no stack trace, SQL or secret)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc import aio
from sqlalchemy.exc import IntegrityError

from interceptors.errors import ErrorMapping
from interceptors.request_id import RequestId
from learnmesh.course.v1 import course_pb2, course_pb2_grpc
from learnmesh.kernel.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from tests.support.doubles import COURSE_ID, CourseDouble
from tests.support.servers import chain_links, serve
from tests.support.status import error_reason

SECRET = "hunter2-api-key"


class Failing(CourseDouble):
    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    async def GetCourse(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        raise self.error


async def call(error: BaseException) -> aio.AioRpcError:
    served = await serve(chain_links(RequestId, ErrorMapping), course=Failing(error))
    try:
        async with aio.insecure_channel(served.address) as channel:
            with pytest.raises(aio.AioRpcError) as caught:
                await course_pb2_grpc.CourseServiceStub(channel).GetCourse(
                    course_pb2.GetCourseRequest(course_id=COURSE_ID),
                    metadata=(("x-request-id", "req-42"),),
                )
        return caught.value
    finally:
        await served.stop()


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(f"connect failed with password {SECRET}"),
        IntegrityError(f"INSERT INTO users VALUES ('{SECRET}')", {}, Exception("dup")),
        KeyError(SECRET),
    ],
)
async def test_unexpected_errors_become_a_generic_internal_with_the_request_id(
    error: BaseException,
) -> None:
    err = await call(error)
    assert err.code() == grpc.StatusCode.INTERNAL
    text = (err.details() or "") + repr(err.trailing_metadata())
    assert "internal error" in text and "req-42" in text
    for leak in (SECRET, "INSERT", "Traceback", "password"):
        assert leak not in text
    assert dict(err.trailing_metadata())["x-request-id"] == "req-42"


async def test_domain_errors_keep_their_code_message_and_reason() -> None:
    err = await call(NotFound("no course with that id", reason="COURSE_NOT_FOUND"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "no course with that id"
    assert error_reason(err) == "COURSE_NOT_FOUND"

    err = await call(FailedPrecondition("enrol first"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_field_with_several_violations_is_named_once_in_the_message() -> None:
    error = InvalidArgument(
        [
            FieldViolation("profile.display_name", "must not contain control characters"),
            FieldViolation("profile.display_name", "must contain a visible character"),
            FieldViolation("profile.bio", "too long"),
        ]
    )
    assert error.message == "invalid request: profile.display_name, profile.bio"
    assert len(error.violations) == 3  # every violation is still in the details
