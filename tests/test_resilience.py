"""The client chain under failure: deadlines, retries, the retry budget, the breaker.

"A" is a server with the real server chain links for deadlines whose handler calls "B"
through the runtime's ClientFactory (the real client chain and native retry policy).
For deadline cancellation, B runs in another process.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
from grpc import aio
from prometheus_client import REGISTRY

from interceptors.deadline import Deadline
from interceptors.errors import ErrorMapping
from interceptors.link import ServerLink
from interceptors.request_id import RequestId
from learnmesh import config
from learnmesh.client import ClientFactory
from learnmesh.course.v1 import course_pb2, course_pb2_grpc
from tests.support.doubles import COURSE_ID, CourseDouble
from tests.support.processes import ServerProcess, python_module, server_process
from tests.support.servers import Served, chain_links, serve

GET = course_pb2.GetCourseRequest(course_id=COURSE_ID)
CREATE = course_pb2.CreateCourseRequest(
    title="Python", description="x" * 20, category="code", level=course_pb2.LEVEL_BEGINNER
)


def factory_for(b_address: str, **client: Any) -> ClientFactory:
    base = config.load(env={})
    settings = replace(base, course_address=b_address, client=replace(base.client, **client))
    return ClientFactory(settings)


class RelayA(course_pb2_grpc.CourseServiceServicer):
    """A: serves GetCourse by calling B's GetCourse while serving the call."""

    def __init__(self, clients: ClientFactory) -> None:
        self.clients = clients

    async def GetCourse(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        return await self.clients.stub("course").GetCourse(request)


def deadline_links(default: float = 10.0, cap: float = 30.0) -> list[ServerLink]:
    """The product chain's request id, error mapping and deadline links, with these
    deadline settings."""
    base = config.load(env={})
    settings = replace(base, deadlines=replace(base.deadlines, default=default, cap=cap))
    return chain_links(RequestId, ErrorMapping, Deadline, settings=settings)


async def start_a_served(clients: ClientFactory, **kw: float) -> Served:
    return await serve(deadline_links(**kw), course=RelayA(clients))


@pytest.fixture
async def b_process() -> AsyncIterator[ServerProcess]:
    """B in another process, slow (5 s per call); killed (SIGKILL) afterwards."""
    command = python_module("tests.support.double_process", "--delay", "5")
    async with server_process(command) as b:
        yield b


async def b_stats(address: str) -> dict[str, Any]:
    async with aio.insecure_channel(address) as channel:
        reply = await course_pb2_grpc.CourseServiceStub(channel).ListCourses(
            course_pb2.ListCoursesRequest(), timeout=5
        )
        stats: dict[str, Any] = json.loads(reply.courses[0].title)
        return stats


async def test_b_sees_the_reduced_deadline_and_is_cancelled_when_it_passes(
    b_process: ServerProcess,
) -> None:
    b_address = b_process.address
    clients = factory_for(b_address)
    a = await start_a_served(clients)
    try:
        async with aio.insecure_channel(a.address) as channel:
            started = time.monotonic()
            with pytest.raises(aio.AioRpcError) as err:
                await course_pb2_grpc.CourseServiceStub(channel).GetCourse(GET, timeout=1.0)
            elapsed = time.monotonic() - started
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.9 <= elapsed < 1.5, f"caller waited {elapsed:.2f} s for a 1 s deadline"
        await asyncio.sleep(0.3)
        stats = await b_stats(b_address)
        assert stats["calls"] == 1
        # B saw A's remaining time minus the margin, not "no deadline".
        assert stats["deadlines"][0] is not None and 0.5 < stats["deadlines"][0] < 0.96
        assert stats["cancelled"] == 1, "B's handler kept running after the deadline"
    finally:
        await a.stop()
        await clients.close()


async def test_default_deadline_and_cap_apply_per_method() -> None:
    b = CourseDouble()
    b.script.delay = 2.0
    served_b = await serve([], course=b)
    clients = factory_for(served_b.address)
    a = await start_a_served(clients, default=0.3, cap=0.5)
    try:
        async with aio.insecure_channel(a.address) as channel:
            stub = course_pb2_grpc.CourseServiceStub(channel)
            for timeout in (None, 60.0):  # no deadline → default; a long one → cap
                started = time.monotonic()
                with pytest.raises(aio.AioRpcError) as err:
                    await stub.GetCourse(GET, timeout=timeout)
                elapsed = time.monotonic() - started
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "deadline" in (err.value.details() or "").lower()
                assert elapsed < 1.0
        assert all(d is not None and d <= 0.5 for d in b.script.deadlines)
    finally:
        await a.stop()
        await served_b.stop()
        await clients.close()


class Blocking(course_pb2_grpc.CourseServiceServicer):
    """A handler that holds the event loop past its deadline (no loop timer can fire)."""

    async def GetCourse(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        time.sleep(0.15)  # noqa: ASYNC251 - the point: the loop is held past the deadline
        return course_pb2.GetCourseResponse(course=course_pb2.Course(id=request.course_id))


async def test_an_answer_made_after_the_deadline_is_deadline_exceeded() -> None:
    """Timers fire late: the deadline decides, not which side of the race they land on."""
    served = await serve(deadline_links(default=0.05), course=Blocking())
    try:
        async with aio.insecure_channel(served.address) as channel:
            stub = course_pb2_grpc.CourseServiceStub(channel)
            with pytest.raises(aio.AioRpcError) as err:
                await stub.GetCourse(GET)  # no deadline of its own: the 50 ms default
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "did not finish within its deadline" in (err.value.details() or "")
    finally:
        await served.stop()


async def test_outbound_call_fails_fast_when_no_time_is_left() -> None:
    b = CourseDouble()
    served_b = await serve([], course=b)
    base = config.load(env={})
    settings = replace(
        base,
        course_address=served_b.address,
        deadlines=replace(base.deadlines, propagation_margin=5.0),
    )
    clients = ClientFactory(settings)
    a = await start_a_served(clients)
    try:
        async with aio.insecure_channel(a.address) as channel:
            with pytest.raises(aio.AioRpcError) as err:
                await course_pb2_grpc.CourseServiceStub(channel).GetCourse(GET, timeout=2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert b.script.calls == 0
    finally:
        await a.stop()
        await served_b.stop()
        await clients.close()


@pytest.fixture
async def b_double() -> AsyncIterator[tuple[CourseDouble, Served]]:
    double = CourseDouble()
    served = await serve([], course=double)
    yield double, served
    await served.stop()


async def test_reads_are_retried_and_non_idempotent_writes_are_not(
    b_double: tuple[CourseDouble, Served],
) -> None:
    double, served = b_double
    clients = factory_for(served.address)
    stub = clients.stub("course")
    try:
        double.script.fail_times = 2
        reply = await stub.GetCourse(GET, timeout=5)  # NO_SIDE_EFFECTS
        assert reply.course.id == COURSE_ID
        assert double.script.calls == 3

        double.script.calls, double.script.fail_times = 0, 2
        await stub.Enroll(course_pb2.EnrollRequest(course_id=COURSE_ID), timeout=5)  # IDEMPOTENT
        assert double.script.calls == 3

        double.script.calls, double.script.fail_times = 0, 2
        with pytest.raises(aio.AioRpcError) as err:
            await stub.CreateCourse(CREATE, timeout=5)  # no idempotency level
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert double.script.calls == 1
    finally:
        await clients.close()


async def test_server_pushback_is_honoured(b_double: tuple[CourseDouble, Served]) -> None:
    double, served = b_double
    clients = factory_for(served.address)
    try:
        double.script.fail_times, double.script.pushback_ms = 1, 400
        started = time.monotonic()
        await clients.stub("course").GetCourse(GET, timeout=5)
        assert time.monotonic() - started >= 0.4
        assert double.script.calls == 2

        double.script.calls, double.script.fail_times, double.script.pushback_ms = 0, 1, -1
        with pytest.raises(aio.AioRpcError):  # negative pushback: do not retry
            await clients.stub("course").GetCourse(GET, timeout=5)
        assert double.script.calls == 1
    finally:
        await clients.close()


async def test_retry_budget_caps_the_extra_load(b_double: tuple[CourseDouble, Served]) -> None:
    double, served = b_double
    # A breaker that never opens, so only the budget limits the load.
    clients = factory_for(served.address, breaker_failures=10_000)
    double.script.fail_times = 10_000
    try:
        for _ in range(40):
            with pytest.raises(aio.AioRpcError):
                await clients.stub("course").GetCourse(GET, timeout=5)
        # Without a budget: 40 calls x 4 attempts = 160. With 10 tokens at 0.1 per success
        # (none here), retries stop once half the tokens are spent.
        assert 40 <= double.script.calls <= 50, double.script.calls
    finally:
        await clients.close()


def breaker_state(target: str) -> float | None:
    return REGISTRY.get_sample_value("learnmesh_circuit_breaker_state", {"target": target})


async def test_breaker_opens_fails_fast_half_opens_and_closes(
    b_double: tuple[CourseDouble, Served],
) -> None:
    double, served = b_double
    clients = factory_for(
        served.address, breaker_failures=5, breaker_reset_timeout=0.5, breaker_half_open_successes=3
    )
    stub = clients.stub("course")
    double.script.fail_times = 10_000
    try:
        for _ in range(5):  # CreateCourse: not retried, so one B call per failure
            with pytest.raises(aio.AioRpcError):
                await stub.CreateCourse(CREATE, timeout=5)
        assert breaker_state(served.address) == 1
        calls = double.script.calls
        started = time.monotonic()
        with pytest.raises(aio.AioRpcError) as err:
            await stub.CreateCourse(CREATE, timeout=5)
        assert time.monotonic() - started < 0.05
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"circuit breaker open for {served.address}" in (err.value.details() or "")
        assert double.script.calls == calls  # failed fast, B not called

        double.script.fail_times = 0  # B recovers
        await asyncio.sleep(0.6)
        for _ in range(3):
            await stub.CreateCourse(CREATE, timeout=5)
        assert breaker_state(served.address) == 0

        double.script.fail_times = 10_000  # and a failure while half-open reopens it
        for _ in range(5):
            with pytest.raises(aio.AioRpcError):
                await stub.CreateCourse(CREATE, timeout=5)
        await asyncio.sleep(0.6)
        with pytest.raises(aio.AioRpcError):
            await stub.CreateCourse(CREATE, timeout=5)
        assert breaker_state(served.address) == 1
    finally:
        await clients.close()


async def test_request_id_travels_to_b(b_double: tuple[CourseDouble, Served]) -> None:
    double, served = b_double
    clients = factory_for(served.address)
    a = await start_a_served(clients)
    try:
        async with aio.insecure_channel(a.address) as channel:
            await course_pb2_grpc.CourseServiceStub(channel).GetCourse(
                GET, metadata=(("x-request-id", "req-123"),), timeout=5
            )
        assert double.script.metadata[-1].get("x-request-id") == "req-123"
    finally:
        await a.stop()
        await clients.close()
