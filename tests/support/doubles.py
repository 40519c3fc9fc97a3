"""Test doubles of mesh services ("B" in A-calls-B tests).

The doubles implement real generated servicer interfaces (course and file, which have no
implementation yet) with scriptable behaviour: fail a number of times, be slow, record the
deadline they saw and whether they were cancelled. They exist only in tests.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from learnmesh.course.v1 import course_pb2, course_pb2_grpc
from learnmesh.file.v1 import file_pb2, file_pb2_grpc

COURSE_ID = "6f1c1f4e-8d1a-4c56-9a43-0e6f2b7d9a10"


@dataclass
class Script:
    """What a double does on its next calls."""

    fail_times: int = 0
    fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    delay: float = 0.0
    # Sent with scripted failures as grpc-retry-pushback-ms (server pushback), when set.
    pushback_ms: int | None = None
    # Recorded:
    calls: int = 0
    deadlines: list[float | None] = field(default_factory=list)
    cancelled: int = 0
    metadata: list[dict[str, str]] = field(default_factory=list)


class CourseDouble(course_pb2_grpc.CourseServiceServicer):
    def __init__(self) -> None:
        self.script = Script()

    async def _run(self, context: aio.ServicerContext[Any, Any]) -> None:
        s = self.script
        s.calls += 1
        s.deadlines.append(context.time_remaining())
        s.metadata.append({k: str(v) for k, v in context.invocation_metadata() or ()})
        if s.fail_times > 0:
            s.fail_times -= 1
            trailers = (
                () if s.pushback_ms is None else (("grpc-retry-pushback-ms", str(s.pushback_ms)),)
            )
            await context.abort(s.fail_code, "scripted failure", trailers)
        if s.delay:
            try:
                await asyncio.sleep(s.delay)
            except asyncio.CancelledError:
                s.cancelled += 1
                raise

    async def GetCourse(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await self._run(context)
        return course_pb2.GetCourseResponse(
            course=course_pb2.Course(id=request.course_id, title="Intro")
        )

    async def CreateCourse(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await self._run(context)
        return course_pb2.CreateCourseResponse(
            course=course_pb2.Course(id=COURSE_ID, title=request.title)
        )

    async def Enroll(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await self._run(context)
        return course_pb2.EnrollResponse(enrollment_id=COURSE_ID)

    async def ListCourses(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        """Not scripted: reports what the double recorded (for doubles in another process)."""
        s = self.script
        stats = {"calls": s.calls, "cancelled": s.cancelled, "deadlines": s.deadlines}
        return course_pb2.ListCoursesResponse(
            courses=[course_pb2.Course(id=COURSE_ID, title=json.dumps(stats))]
        )


class FileDouble(file_pb2_grpc.FileServiceServicer):
    """Streaming in both directions, to prove every link handles streams."""

    async def Upload(self, request_iterator: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        size = 0
        async for message in request_iterator:
            size += len(message.chunk)
        return file_pb2.UploadResponse(file=file_pb2.FileInfo(id=COURSE_ID, size=size))

    async def Download(
        self, request: Any, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        for index in range(3):
            yield file_pb2.DownloadResponse(chunk=bytes([index]) * 4)
