"""Rate limiting over real servers and channels: tiers, classes, per-address auth limits,
trailers, RetryInfo, streaming, exemptions; and with Redis, one limit shared by two server
processes, and failing open when Redis is down.

The chain is the product's (``tests.support.servers.chain_links``): request id, error
mapping and rate limit in its order, with a test principal (``x-test-user`` / ``x-test-tier``
metadata instead of tokens, tests.support.principal) where the access link would be.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis import asyncio as redis_asyncio

from interceptors.errors import ErrorMapping
from interceptors.method import method_info
from interceptors.ratelimit import (
    LIMIT_HEADER,
    REMAINING_HEADER,
    RESET_HEADER,
    MemoryBackend,
    RateLimit,
    RedisBackend,
    Window,
    backend_for,
    tier_rule,
)
from interceptors.request_id import RequestId
from learnmesh import config
from learnmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from learnmesh.common.v1 import access_pb2
from learnmesh.config import LimitSettings
from learnmesh.course.v1 import course_pb2, course_pb2_grpc
from learnmesh.file.v1 import file_pb2, file_pb2_grpc
from tests.support.doubles import COURSE_ID, CourseDouble, FileDouble
from tests.support.principal import TIER_HEADER, USER_HEADER, MetadataPrincipal
from tests.support.processes import python_module, server_process
from tests.support.servers import chain_links, serve
from tests.support.status import error_reason, retry_delay

REDIS_URL = os.environ.get("LEARNMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() == "true"
RATE_HEADERS = (LIMIT_HEADER, REMAINING_HEADER, RESET_HEADER)
# Per-minute limits high enough that only the window a test looks at can refuse.
ROOMY_BURST = 100.0


class FakeClock:
    """A monotonic clock the test moves by hand (the memory backend's windows)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CourseWithDelete(CourseDouble):
    async def DeleteCourse(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        return course_pb2.DeleteCourseResponse()


class AuthDouble(auth_pb2_grpc.AuthServiceServicer):
    """Methods of every auth rate class: login, register, password reset, exempt, internal."""

    async def Login(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        return auth_pb2.LoginResponse()

    async def Register(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        return auth_pb2.RegisterResponse()

    async def RequestPasswordReset(
        self, request: Any, context: aio.ServicerContext[Any, Any]
    ) -> Any:
        return auth_pb2.RequestPasswordResetResponse()

    async def GetJwks(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        return auth_pb2.GetJwksResponse()

    async def IntrospectToken(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        return auth_pb2.IntrospectTokenResponse()


@dataclass
class Target:
    channel: aio.Channel
    link: RateLimit | None = None

    @property
    def course(self) -> course_pb2_grpc.CourseServiceStub:
        return course_pb2_grpc.CourseServiceStub(self.channel)

    @property
    def files(self) -> file_pb2_grpc.FileServiceStub:
        return file_pb2_grpc.FileServiceStub(self.channel)

    @property
    def auth(self) -> auth_pb2_grpc.AuthServiceStub:
        return auth_pb2_grpc.AuthServiceStub(self.channel)

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel)


@asynccontextmanager
async def limited(
    *, backend: Any = None, clock: FakeClock | None = None, **limits: Any
) -> AsyncIterator[Target]:
    """A real server (course, file, auth doubles and health) behind the rate-limit chain."""
    settings = replace(config.load(env={}), limits=replace(LimitSettings(), **limits))
    if backend is None:
        backend = MemoryBackend(clock=clock) if clock else MemoryBackend()
    links = chain_links(
        RequestId,
        ErrorMapping,
        RateLimit,
        settings=settings,
        rate_limit_backend=backend,
        extra=MetadataPrincipal(),
        before=RateLimit,
    )
    (link,) = [link for link in links if isinstance(link, RateLimit)]
    # Wired as the product wires it: every servicer registers through the chain.
    served = await serve(
        links, course=CourseWithDelete(), files=FileDouble(), auth=AuthDouble(), with_health=True
    )
    channel = aio.insecure_channel(served.address)
    try:
        yield Target(channel, link)
    finally:
        await channel.close()
        await served.stop()  # and the links: the rate limit's backend


def as_user(user_id: str | None = None, tier: str = "free") -> tuple[tuple[str, str], ...]:
    return ((USER_HEADER, user_id or uuid.uuid4().hex), (TIER_HEADER, tier))


@dataclass
class Outcome:
    code: grpc.StatusCode
    trailers: dict[str, Any]
    message: str = ""
    error: aio.AioRpcError | None = None

    @property
    def limit(self) -> int:
        return int(self.trailers[LIMIT_HEADER])

    @property
    def remaining(self) -> int:
        return int(self.trailers[REMAINING_HEADER])

    @property
    def reset(self) -> int:
        return int(self.trailers[RESET_HEADER])

    @property
    def retry_delay(self) -> float:
        """Seconds in the google.rpc.RetryInfo detail of a refused call."""
        assert self.error is not None, f"{self.code} is not a refusal"
        return retry_delay(self.error)

    @property
    def reason(self) -> str:
        assert self.error is not None, f"{self.code} is not a refusal"
        return error_reason(self.error)


def _refused(err: aio.AioRpcError) -> Outcome:
    return Outcome(err.code(), dict(err.trailing_metadata() or ()), err.details() or "", err)


async def outcome(call: Any) -> Outcome:
    """The status and trailing metadata of a unary-response call."""
    try:
        await call
    except aio.AioRpcError as err:
        return _refused(err)
    return Outcome(grpc.StatusCode.OK, dict(await call.trailing_metadata()))


async def stream_outcome(call: Any, expected_messages: int) -> Outcome:
    """The same for a server-streaming call, after reading every message."""
    try:
        received = [message async for message in call]
    except aio.AioRpcError as err:
        return _refused(err)
    assert len(received) == expected_messages
    return Outcome(grpc.StatusCode.OK, dict(await call.trailing_metadata()))


def get_course(target: Target, metadata: Sequence[tuple[str, str]] = ()) -> Any:
    return target.course.GetCourse(
        course_pb2.GetCourseRequest(course_id=COURSE_ID), metadata=tuple(metadata)
    )


def enroll(target: Target, metadata: Sequence[tuple[str, str]]) -> Any:
    return target.course.Enroll(
        course_pb2.EnrollRequest(course_id=COURSE_ID), metadata=tuple(metadata)
    )


def login(target: Target, metadata: Sequence[tuple[str, str]] = ()) -> Any:
    return target.auth.Login(
        auth_pb2.LoginRequest(email="a@example.com", password="x" * 12), metadata=tuple(metadata)
    )


async def run(calls: int, make: Any) -> list[Outcome]:
    return [await outcome(make()) for _ in range(calls)]


# --- memory backend --------------------------------------------------------------------


async def test_exceeding_the_limit_gives_resource_exhausted_with_retry_info() -> None:
    async with limited(free_per_minute=3, burst_multiplier=ROOMY_BURST) as target:
        user = as_user()
        passed = await run(3, lambda: get_course(target, user))
        assert [o.code for o in passed] == [grpc.StatusCode.OK] * 3
        refused = await outcome(get_course(target, user))
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.message.startswith(
        "rate limit exceeded: 3 calls per 60 s for reads by a free-tier caller; retry in "
    )
    assert 0 < refused.retry_delay <= 60
    assert refused.reason == "RATE_LIMITED"
    # The refused call still reports where the caller stands.
    assert (refused.limit, refused.remaining) == (3, 0)


async def test_every_limited_call_reports_limit_remaining_and_reset() -> None:
    async with limited(free_per_minute=4, burst_multiplier=ROOMY_BURST) as target:
        user = as_user()
        before = time.time()
        outcomes = await run(4, lambda: get_course(target, user))
    assert all(o.code == grpc.StatusCode.OK for o in outcomes)
    assert [o.limit for o in outcomes] == [4, 4, 4, 4]
    assert [o.remaining for o in outcomes] == [3, 2, 1, 0]
    for o in outcomes:
        # Unix seconds at which the first call of the window leaves it.
        assert before + 59 <= o.reset <= time.time() + 61
    # The request id link's trailer survives next to ours.
    assert "x-request-id" in outcomes[0].trailers


async def test_refused_calls_are_not_counted_and_windows_slide() -> None:
    clock = FakeClock()
    async with limited(clock=clock, free_per_minute=3, burst_multiplier=ROOMY_BURST) as target:
        user = as_user()
        assert all(
            o.code == grpc.StatusCode.OK for o in await run(3, lambda: get_course(target, user))
        )
        clock.advance(30)
        refused = await run(5, lambda: get_course(target, user))
        assert {o.code for o in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert 29 <= refused[0].retry_delay <= 30
        clock.advance(30.5)
        # The three calls of t=0 have left the window; the refused ones of t=30 never entered.
        again = await run(4, lambda: get_course(target, user))
    assert [o.code for o in again] == [grpc.StatusCode.OK] * 3 + [
        grpc.StatusCode.RESOURCE_EXHAUSTED
    ]
    assert [o.remaining for o in again[:3]] == [2, 1, 0]


async def test_writes_get_half_and_deletes_a_quarter_of_the_read_limit_each_counted_apart() -> None:
    async with limited(free_per_minute=8, burst_multiplier=ROOMY_BURST) as target:
        user = as_user()
        writes = await run(5, lambda: enroll(target, user))
        deletes = await run(
            3,
            lambda: target.course.DeleteCourse(
                course_pb2.DeleteCourseRequest(course_id=COURSE_ID), metadata=user
            ),
        )
        # Writes and deletes used up do not touch the reads.
        reads = await run(9, lambda: get_course(target, user))
    ok, refused = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [o.code for o in writes] == [ok] * 4 + [refused]
    assert writes[0].limit == 4
    assert "4 calls per 60 s for writes by a free-tier caller" in writes[-1].message
    assert [o.code for o in deletes] == [ok] * 2 + [refused]
    assert deletes[0].limit == 2
    assert "for deletes" in deletes[-1].message
    assert [o.code for o in reads] == [ok] * 8 + [refused]
    assert reads[0].limit == 8


async def test_tiers_have_their_own_limits() -> None:
    async with limited(free_per_minute=2, pro_per_minute=5, burst_multiplier=ROOMY_BURST) as target:
        free = await run(3, lambda: get_course(target, as_user("free-user", "free")))
        pro = await run(6, lambda: get_course(target, as_user("pro-user", "pro")))
        # An unknown tier counts as free.
        odd = await run(3, lambda: get_course(target, as_user("odd-user", "platinum")))
    ok, refused = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [o.code for o in free] == [ok, ok, refused]
    assert [o.code for o in pro] == [ok] * 5 + [refused]
    assert [o.code for o in odd] == [ok, ok, refused]
    assert (free[0].limit, pro[0].limit) == (2, 5)
    assert "reads by a pro-tier caller" in pro[-1].message


async def test_anonymous_callers_count_by_address_at_the_free_tier() -> None:
    async with limited(
        free_per_minute=2, pro_per_minute=50, burst_multiplier=ROOMY_BURST
    ) as target:
        anonymous = await run(3, lambda: get_course(target))
        # A signed-in caller from the same address has a budget of their own.
        signed_in = await outcome(get_course(target, as_user(tier="pro")))
    assert [o.code for o in anonymous] == [grpc.StatusCode.OK] * 2 + [
        grpc.StatusCode.RESOURCE_EXHAUSTED
    ]
    assert anonymous[0].limit == 2
    assert "not signed in: counted by address" in anonymous[-1].message
    assert signed_in.code == grpc.StatusCode.OK and signed_in.limit == 50


async def test_the_burst_window_caps_short_bursts_and_slides() -> None:
    # 60 a minute, but at most 2 x (60 x 1 / 60) = 2 in any 1 s.
    async with limited(free_per_minute=60, burst_multiplier=2.0, burst_window=1) as target:
        user = as_user()
        burst = await run(3, lambda: get_course(target, user))
        assert [o.code for o in burst] == [grpc.StatusCode.OK] * 2 + [
            grpc.StatusCode.RESOURCE_EXHAUSTED
        ]
        # The tightest window is reported: the burst window, not the minute.
        assert [o.limit for o in burst] == [2, 2, 2]
        assert "2 calls per 1 s" in burst[-1].message
        delay = burst[-1].retry_delay
        assert 0 < delay <= 1
        await asyncio.sleep(delay + 0.05)
        after = await outcome(get_course(target, user))
    assert after.code == grpc.StatusCode.OK


async def test_login_is_limited_per_address_per_minute_and_per_hour() -> None:
    clock = FakeClock()
    async with limited(
        clock=clock,
        login_per_minute=2,
        login_per_hour=3,
        register_per_minute=1,
        free_per_minute=1,
        burst_multiplier=ROOMY_BURST,
    ) as target:
        # Different users, one address: the address is what counts.
        first = await run(3, lambda: login(target, as_user()))
        assert [o.code for o in first] == [grpc.StatusCode.OK] * 2 + [
            grpc.StatusCode.RESOURCE_EXHAUSTED
        ]
        assert first[0].limit == 2
        assert first[-1].message.startswith(
            "rate limit exceeded: 2 calls per 60 s for login calls from this address"
        )
        assert 0 < first[-1].retry_delay <= 60
        # A login flood uses up neither reads nor registrations nor password resets.
        read = await outcome(get_course(target, as_user()))
        register = await outcome(target.auth.Register(auth_pb2.RegisterRequest()))
        reset = await outcome(
            target.auth.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest())
        )
        assert (read.code, register.code, reset.code) == (grpc.StatusCode.OK,) * 3
        clock.advance(61)
        later = await run(2, lambda: login(target))
        second_register = await run(2, lambda: target.auth.Register(auth_pb2.RegisterRequest()))
    assert [o.code for o in later] == [grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert "3 calls per 3600 s for login calls from this address" in later[-1].message
    assert 3600 - 62 <= later[-1].retry_delay <= 3600 - 60
    assert (later[-1].limit, later[-1].remaining) == (3, 0)
    assert [o.code for o in second_register] == [
        grpc.StatusCode.OK,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ]
    assert "1 call per 60 s for register calls" in second_register[-1].message


async def test_a_refusal_waits_for_the_window_that_frees_last() -> None:
    # Both windows full after one call: retrying after the minute would still be refused.
    async with limited(password_reset_per_minute=1, password_reset_per_hour=1) as target:
        request = auth_pb2.RequestPasswordResetRequest()
        outcomes = await run(2, lambda: target.auth.RequestPasswordReset(request))
    assert [o.code for o in outcomes] == [grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert "1 call per 3600 s for password reset calls from this address" in outcomes[1].message
    assert 3599 <= outcomes[1].retry_delay <= 3600
    assert time.time() + 3598 <= outcomes[1].reset <= time.time() + 3601


async def test_exempt_internal_and_grpc_methods_are_never_limited_and_carry_no_trailers() -> None:
    async with limited(free_per_minute=1, login_per_minute=1, burst_multiplier=1.0) as target:
        outcomes = [
            *await run(5, lambda: target.auth.GetJwks(auth_pb2.GetJwksRequest())),
            *await run(5, lambda: target.auth.IntrospectToken(auth_pb2.IntrospectTokenRequest())),
            # grpc_health's stubs declare no HealthStub methods
            *await run(5, lambda: target.health.Check(health_pb2.HealthCheckRequest())),  # type: ignore[attr-defined]
        ]
        link = target.link
    assert link is not None
    assert all(o.code == grpc.StatusCode.OK for o in outcomes)
    for o in outcomes:
        assert "x-request-id" in o.trailers
        assert not set(RATE_HEADERS) & set(o.trailers)

    # Zero cost: their behaviour is handed back unwrapped.
    def behavior() -> None: ...

    for name in (
        "/learnmesh.auth.v1.AuthService/GetJwks",
        "/learnmesh.auth.v1.AuthService/IntrospectToken",
        "/learnmesh.user.v1.UserService/CreateUser",
        "/grpc.health.v1.Health/Check",
    ):
        assert link.wrap(method_info(name), behavior) is behavior
    assert link.wrap(method_info("/learnmesh.auth.v1.AuthService/Login"), behavior) is not behavior


async def test_streaming_calls_are_counted() -> None:
    async with limited(free_per_minute=4, burst_multiplier=ROOMY_BURST) as target:
        user = as_user()

        async def chunks() -> AsyncIterator[file_pb2.UploadRequest]:
            yield file_pb2.UploadRequest(header=file_pb2.UploadHeader(filename="a.txt"))
            yield file_pb2.UploadRequest(chunk=b"abcd")

        uploads = await run(3, lambda: target.files.Upload(chunks(), metadata=user))
        downloads = [
            await stream_outcome(
                target.files.Download(file_pb2.DownloadRequest(file_id=COURSE_ID), metadata=user),
                expected_messages=3,
            )
            for _ in range(5)
        ]
    ok, refused = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
    # Upload is a write (half of 4), Download a read.
    assert [o.code for o in uploads] == [ok, ok, refused]
    assert [o.remaining for o in uploads] == [1, 0, 0]
    assert 0 < uploads[-1].retry_delay <= 60
    assert [o.code for o in downloads] == [ok] * 4 + [refused]
    assert [o.remaining for o in downloads] == [3, 2, 1, 0, 0]
    assert 0 < downloads[-1].retry_delay <= 60


async def test_disabled_limits_leave_every_call_alone() -> None:
    async with limited(enabled=False, free_per_minute=1) as target:
        outcomes = await run(4, lambda: get_course(target))
    assert all(o.code == grpc.StatusCode.OK for o in outcomes)
    assert not set(RATE_HEADERS) & set(outcomes[0].trailers)


def test_rules_follow_the_reference_tiers() -> None:
    limits = LimitSettings()
    read_free = tier_rule(limits, access_pb2.RATE_CLASS_READ, "free")
    assert read_free.windows == (Window(10, 10), Window(60, 30))
    assert tier_rule(limits, access_pb2.RATE_CLASS_WRITE, "pro").windows == (
        Window(10, 20),
        Window(60, 60),
    )
    assert tier_rule(limits, access_pb2.RATE_CLASS_DELETE, "enterprise").windows == (
        Window(10, 25),
        Window(60, 75),
    )
    assert isinstance(backend_for(config.load(env={}).redis_url), MemoryBackend)


async def test_memory_backend_stays_bounded_and_drops_idle_callers() -> None:
    clock = FakeClock()
    backend = MemoryBackend(max_keys=100, clock=clock)
    rule = tier_rule(LimitSettings(), access_pb2.RATE_CLASS_READ, "free")
    for index in range(1000):
        assert (await backend.hit(rule, f"addr:10.0.{index // 256}.{index % 256}")).allowed
    assert len(backend) == 100
    clock.advance(61)
    await backend.hit(rule, "addr:192.0.2.1")
    assert len(backend) == 1


# --- Redis -------------------------------------------------------------------------------


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own on a reachable Redis; its keys are removed after."""
    client = redis_asyncio.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        reason = f"Redis at {REDIS_URL} unreachable ({type(exc).__name__}: {exc})"
        if IN_CI:
            pytest.fail(f"{reason}; CI=true requires Redis")
        pytest.skip(reason)
    prefix = f"learnmesh:test:{uuid.uuid4().hex[:10]}:"
    try:
        yield prefix
    finally:
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@asynccontextmanager
async def server_processes(count: int, prefix: str, *args: str) -> AsyncIterator[list[Target]]:
    """``count`` separate rate-limited B processes (``tests.support.double_process
    --rate-limit``) sharing ``prefix`` in Redis."""
    command = python_module("tests.support.double_process", "--rate-limit", REDIS_URL, prefix)
    async with AsyncExitStack() as stack:
        targets = []
        for _ in range(count):
            proc = await stack.enter_async_context(server_process([*command, *args]))
            stack.push_async_callback(proc.stop)  # SIGTERM: it closes its Redis client
            channel = aio.insecure_channel(proc.address)
            stack.push_async_callback(channel.close)
            targets.append(Target(channel))
        yield targets


async def test_two_server_processes_share_one_limit_in_redis(redis_prefix: str) -> None:
    async with server_processes(2, redis_prefix, "--free-per-minute", "6") as (one, two):
        user = as_user()
        alternating = [
            await outcome(get_course(one if index % 2 == 0 else two, user)) for index in range(8)
        ]
        ok, refused = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
        assert [o.code for o in alternating] == [ok] * 6 + [refused] * 2
        assert [o.remaining for o in alternating] == [5, 4, 3, 2, 1, 0, 0, 0]
        assert {o.limit for o in alternating} == {6}
        for o in alternating[6:]:
            assert 0 < o.retry_delay <= 60
            assert "6 calls per 60 s for reads by a free-tier caller" in o.message
        # Exactly the limit, even with calls racing on both processes at once.
        racer = as_user()
        raced = await asyncio.gather(
            *(outcome(get_course(one if i % 2 else two, racer)) for i in range(14))
        )
    assert sum(o.code == ok for o in raced) == 6
    assert sum(o.code == refused for o in raced) == 8


async def test_redis_keys_name_class_caller_and_window_and_expire(redis_prefix: str) -> None:
    backend = RedisBackend(REDIS_URL, prefix=redis_prefix)
    async with limited(
        backend=backend, free_per_minute=6, burst_window=10, login_per_minute=1, login_per_hour=1
    ) as target:
        first = await outcome(get_course(target, as_user("someone")))
        logins = await run(2, lambda: login(target))
    assert first.code == grpc.StatusCode.OK
    # Both login windows are full: the refusal waits for the hour, not the minute.
    assert [o.code for o in logins] == [grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert 3599 <= logins[1].retry_delay <= 3600
    assert (first.limit, first.remaining) == (2, 1)  # the burst window: 2 x 6 x 10 / 60
    client = redis_asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        keys = sorted([key async for key in client.scan_iter(match=redis_prefix + "*")])
        assert keys == sorted(
            [
                f"{redis_prefix}read:user:someone:10",
                f"{redis_prefix}read:user:someone:60",
                f"{redis_prefix}login:addr:127.0.0.1:60",
                f"{redis_prefix}login:addr:127.0.0.1:3600",
            ]
        )
        assert 0 < await client.pttl(f"{redis_prefix}read:user:someone:10") <= 10_000
        assert 0 < await client.pttl(f"{redis_prefix}login:addr:127.0.0.1:3600") <= 3_600_000
    finally:
        await client.aclose()


async def test_redis_windows_slide_and_refused_calls_are_not_counted(redis_prefix: str) -> None:
    # 2 calls in any 1 s (2 x 60 x 1 / 60), on the Redis server's clock.
    backend = RedisBackend(REDIS_URL, prefix=redis_prefix)
    async with limited(
        backend=backend, free_per_minute=60, burst_multiplier=2.0, burst_window=1
    ) as target:
        user = as_user()
        early = await outcome(get_course(target, user))
        await asyncio.sleep(0.5)
        late = await outcome(get_course(target, user))
        refused = await run(3, lambda: get_course(target, user))
        delay = refused[0].retry_delay
        assert 0.3 <= delay <= 0.6  # when the early call leaves the window
        await asyncio.sleep(delay + 0.05)
        # The early call has left the window, the late one has not, and the refused ones
        # never entered it: exactly one slot is free.
        after = await run(2, lambda: get_course(target, user))
    ok, no = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (early.code, early.remaining, late.code, late.remaining) == (ok, 1, ok, 0)
    assert [o.code for o in refused] == [no] * 3
    assert "2 calls per 1 s" in refused[0].message
    assert [o.code for o in after] == [ok, no]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_redis_down_fails_open_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    backend = RedisBackend(
        f"redis://127.0.0.1:{_closed_port()}/0", prefix="learnmesh:test:down:", retry_interval=0
    )
    caplog.set_level(logging.WARNING, logger="learnmesh.ratelimit")
    async with limited(backend=backend, free_per_minute=1, burst_multiplier=1.0) as target:
        outcomes = await run(5, lambda: get_course(target, as_user("u")))
    assert all(o.code == grpc.StatusCode.OK for o in outcomes)
    assert not set(RATE_HEADERS) & set(outcomes[0].trailers)
    warnings = [r for r in caplog.records if r.name == "learnmesh.ratelimit"]
    assert len(warnings) == 1
    assert "failing open" in warnings[0].getMessage()
