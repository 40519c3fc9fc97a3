"""The admin port as probes and scrapers see it: real servers, real sockets, real clients.

One plaintext port answers gRPC health (the main server's own servicer, so statuses agree)
and HTTP /healthz, /readyz, /metrics; business methods are unreachable through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY, Counter

from learnmesh.admin import AdminLimits, AdminServer, start_admin
from learnmesh.course.v1 import course_pb2, course_pb2_grpc
from learnmesh.db import Database
from tests.conftest import IN_CI, POSTGRES_URL, postgres_unreachable
from tests.support.doubles import COURSE_ID, CourseDouble

COURSE = "learnmesh.course.v1.CourseService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Registered in prometheus_client's default registry, which /metrics serves.
PROBES_SEEN = Counter("learnmesh_admin_test_probes", "Probes counted by the admin port test")


class DatabaseCheck:
    """A ready check whose dependency the test makes fail or hang."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.hang = False

    async def __call__(self) -> None:
        if self.hang:
            await asyncio.sleep(30)
        if self.error is not None:
            raise self.error


@dataclass
class Rig:
    main: aio.Server
    main_port: int
    health: health.aio.HealthServicer
    admin: AdminServer
    database: DatabaseCheck
    course: CourseDouble

    @property
    def admin_address(self) -> str:
        return f"127.0.0.1:{self.admin.port}"

    @property
    def main_address(self) -> str:
        return f"127.0.0.1:{self.main_port}"


@pytest.fixture(scope="module")
async def rig() -> AsyncIterator[Rig]:
    """A main server (course double + health) and its admin port sharing one HealthServicer."""
    servicer = health.aio.HealthServicer()
    course = CourseDouble()
    main = aio.server()
    course_pb2_grpc.add_CourseServiceServicer_to_server(course, main)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, main)
    main_port = main.add_insecure_port("127.0.0.1:0")
    await main.start()
    await servicer.set("", SERVING)
    await servicer.set(COURSE, SERVING)
    database = DatabaseCheck()
    admin = await start_admin("127.0.0.1", 0, servicer, {"database": database}, check_timeout=0.5)
    try:
        yield Rig(main, main_port, servicer, admin, database, course)
    finally:
        await admin.stop()
        await main.stop(0)


@pytest.fixture
async def healthy(rig: Rig) -> AsyncIterator[Rig]:
    """The rig with every status SERVING and its ready check passing, before and after."""
    await rig.health.set(COURSE, SERVING)
    rig.database.error, rig.database.hang = None, False
    yield rig
    await rig.health.set(COURSE, SERVING)
    rig.database.error, rig.database.hang = None, False


async def check(address: str, service: str) -> int:
    async with aio.insecure_channel(address) as channel:
        # grpc_health's stubs declare no HealthStub methods
        reply = await health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)


def _fetch(url: str, method: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers.items()), err.read()


async def http(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """An HTTP/1.1 request to the admin port from urllib (a stock client), off the loop."""
    status, headers, body = await asyncio.to_thread(
        _fetch, f"http://127.0.0.1:{port}{path}", method
    )
    return status, {k.lower(): v for k, v in headers.items()}, body


# gRPC health through the admin port


async def test_check_through_admin_port_agrees_with_main_port(healthy: Rig) -> None:
    for service in ("", COURSE):
        assert await check(healthy.admin_address, service) == SERVING
    await healthy.health.set(COURSE, NOT_SERVING)
    assert await check(healthy.admin_address, COURSE) == NOT_SERVING
    assert await check(healthy.main_address, COURSE) == NOT_SERVING
    assert await check(healthy.admin_address, "") == SERVING


async def test_check_of_unknown_service_is_not_found(healthy: Rig) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await check(healthy.admin_address, "no.such.v1.Service")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_watch_through_admin_port_follows_status_changes(healthy: Rig) -> None:
    async with aio.insecure_channel(healthy.admin_address) as channel:
        # grpc_health's stubs declare no HealthStub methods
        call = health_pb2_grpc.HealthStub(channel).Watch(  # type: ignore[attr-defined]
            health_pb2.HealthCheckRequest(service=COURSE), timeout=10
        )
        updates = call.__aiter__()
        assert (await anext(updates)).status == SERVING
        await healthy.health.set(COURSE, NOT_SERVING)
        assert (await anext(updates)).status == NOT_SERVING
        await healthy.health.set(COURSE, SERVING)
        assert (await anext(updates)).status == SERVING
        call.cancel()


async def test_business_methods_are_not_served_on_admin_port(healthy: Rig) -> None:
    request = course_pb2.GetCourseRequest(course_id=COURSE_ID)
    calls_before = healthy.course.script.calls
    async with aio.insecure_channel(healthy.admin_address) as channel:
        with pytest.raises(aio.AioRpcError) as caught:
            await course_pb2_grpc.CourseServiceStub(channel).GetCourse(request, timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Not even server reflection: the admin port tells nothing about the services.
        # grpc_reflection's stubs: Incomplete from binascii, sync Channel only
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(  # type: ignore[arg-type,operator]
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        with pytest.raises(aio.AioRpcError) as caught:
            await reflect.read()
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert healthy.course.script.calls == calls_before
    # The same stub reaches the method on the main port.
    async with aio.insecure_channel(healthy.main_address) as channel:
        reply = await course_pb2_grpc.CourseServiceStub(channel).GetCourse(request, timeout=5)
    assert reply.course.id == COURSE_ID


# HTTP endpoints


async def test_healthz_says_alive(healthy: Rig) -> None:
    status, headers, body = await http(healthy.admin.port, "/healthz")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert json.loads(body) == {"status": "alive"}


async def test_healthz_stays_alive_while_not_ready(healthy: Rig) -> None:
    await healthy.health.set("", NOT_SERVING)
    try:
        status, _, body = await http(healthy.admin.port, "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "alive"})
    finally:
        await healthy.health.set("", SERVING)


async def test_readyz_ready_when_all_serving_and_checks_pass(healthy: Rig) -> None:
    status, _, body = await http(healthy.admin.port, "/readyz")
    assert status == 200
    report = json.loads(body)
    assert report["status"] == "ready"
    assert report["failed"] == []
    assert report["services"] == {"": "SERVING", COURSE: "SERVING"}
    assert report["checks"] == {"database": "ok"}


async def test_readyz_names_a_service_that_is_not_serving(healthy: Rig) -> None:
    await healthy.health.set(COURSE, NOT_SERVING)
    status, _, body = await http(healthy.admin.port, "/readyz")
    assert status == 503
    report = json.loads(body)
    assert report["status"] == "not ready"
    assert report["failed"] == [f"service '{COURSE}' is NOT_SERVING"]
    assert report["services"][COURSE] == "NOT_SERVING"
    assert report["checks"] == {"database": "ok"}
    await healthy.health.set(COURSE, SERVING)
    assert (await http(healthy.admin.port, "/readyz"))[0] == 200


async def test_readyz_names_a_failing_check_without_its_message(healthy: Rig) -> None:
    healthy.database.error = ConnectionRefusedError("connect to db.internal:5432 as postgres")
    status, _, body = await http(healthy.admin.port, "/readyz")
    assert status == 503
    report = json.loads(body)
    assert report["failed"] == ["check 'database' failed: ConnectionRefusedError"]
    assert report["checks"] == {"database": "failed: ConnectionRefusedError"}
    # Driver messages can name hosts and users; the unauthenticated port does not repeat them.
    assert b"db.internal" not in body and b"postgres" not in body
    healthy.database.error = None
    assert (await http(healthy.admin.port, "/readyz"))[0] == 200


async def test_readyz_gives_up_on_a_hanging_check(healthy: Rig) -> None:
    healthy.database.hang = True
    started = asyncio.get_running_loop().time()
    status, _, body = await http(healthy.admin.port, "/readyz")
    assert asyncio.get_running_loop().time() - started < 5
    assert status == 503
    assert json.loads(body)["checks"] == {"database": "timed out after 0.5s"}


async def test_readyz_fails_during_graceful_shutdown() -> None:
    servicer = health.aio.HealthServicer()
    await servicer.set(COURSE, SERVING)
    admin = await start_admin("127.0.0.1", 0, servicer)
    try:
        assert (await http(admin.port, "/readyz"))[0] == 200
        await servicer.enter_graceful_shutdown()
        status, _, body = await http(admin.port, "/readyz")
        assert status == 503
        assert json.loads(body)["services"] == {"": "NOT_SERVING", COURSE: "NOT_SERVING"}
    finally:
        await admin.stop()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_readyz_with_the_real_database_ping(tmp_path: Path, backend: str) -> None:
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'ready.db'}"
    else:
        reason = await postgres_unreachable()
        if reason:
            if IN_CI:
                pytest.fail(reason)
            pytest.skip(reason)
        url = POSTGRES_URL.replace("postgresql://", "postgresql+asyncpg://", 1)
    reachable = Database(url)
    # Nothing listens on port 1: what a database outage looks like to the ping.
    unreachable = Database("postgresql+asyncpg://nobody:secret@127.0.0.1:1/gone")
    servicer = health.aio.HealthServicer()
    admin = await start_admin("127.0.0.1", 0, servicer, {"database": reachable.ping})
    down = await start_admin("127.0.0.1", 0, servicer, {"database": unreachable.ping})
    try:
        status, _, body = await http(admin.port, "/readyz")
        assert (status, json.loads(body)["checks"]) == (200, {"database": "ok"})
        status, _, body = await http(down.port, "/readyz")
        assert status == 503
        assert json.loads(body)["checks"] == {"database": "failed: ConnectionRefusedError"}
        assert b"secret" not in body and b"nobody" not in body
    finally:
        await admin.stop()
        await down.stop()
        await reachable.dispose()
        await unreachable.dispose()


async def test_metrics_serves_the_default_registry(healthy: Rig) -> None:
    before = REGISTRY.get_sample_value("learnmesh_admin_test_probes_total") or 0.0
    PROBES_SEEN.inc(3)
    status, headers, body = await http(healthy.admin.port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    assert f"learnmesh_admin_test_probes_total {before + 3}".encode() in body.splitlines()
    assert b"# TYPE learnmesh_admin_test_probes_total counter" in body


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/admin",
        "/healthz/extra",
        "/metricsx",
        f"/{COURSE}/GetCourse",
        "/grpc.health.v1.Health",
    ],
)
async def test_other_paths_are_not_found(healthy: Rig, path: str) -> None:
    status, _, _ = await http(healthy.admin.port, path)
    assert status == 404


async def test_only_get_is_allowed(healthy: Rig) -> None:
    status, _, _ = await http(healthy.admin.port, "/healthz", method="POST")
    assert status == 405
    status, _, body = await http(healthy.admin.port, "/readyz", method="HEAD")
    assert (status, body) == (200, b"")


# Forwarding: connections as raw bytes


async def raw_exchange(port: int, payload: bytes, *, half_close: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        if half_close:
            writer.write_eof()
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_keep_alive_serves_several_requests_on_one_connection(healthy: Rig) -> None:
    requests = (
        b"GET /healthz HTTP/1.1\r\nHost: probe\r\n\r\n"
        b"GET /readyz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"
    )
    reply = await raw_exchange(healthy.admin.port, requests)
    assert reply.count(b"HTTP/1.1 200 OK") == 2
    assert b'{"status":"alive"}' in reply and b'"status":"ready"' in reply


async def test_client_that_half_closes_still_gets_its_answer(healthy: Rig) -> None:
    reply = await raw_exchange(
        healthy.admin.port, b"GET /healthz HTTP/1.0\r\n\r\n", half_close=True
    )
    assert reply.startswith(b"HTTP/1.1 200 OK")
    assert reply.endswith(b'{"status":"alive"}')


async def test_garbage_gets_bad_request_and_port_keeps_working(healthy: Rig) -> None:
    # A TLS ClientHello's first bytes: neither the HTTP/2 preface nor HTTP/1.1.
    reply = await raw_exchange(healthy.admin.port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert reply == b"" or reply.startswith(b"HTTP/1.1 400")
    # A client that connects and leaves without a byte.
    assert await raw_exchange(healthy.admin.port, b"", half_close=True) == b""
    assert await check(healthy.admin_address, "") == SERVING


# Start and stop


def refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def test_stop_closes_the_port_and_open_connections() -> None:
    servicer = health.aio.HealthServicer()
    tasks_before = asyncio.all_tasks()
    admin = await start_admin("127.0.0.1", 0, servicer)
    ports = (admin.port, admin.grpc_port, admin.http_port)
    assert not any(refused(port) for port in ports)
    channel = aio.insecure_channel(f"127.0.0.1:{admin.port}")
    # grpc_health's stubs declare no HealthStub methods
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))  # type: ignore[attr-defined]
    assert (await watch.read()).status == SERVING
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", admin.port)
    try:
        await asyncio.wait_for(admin.stop(), 5)
        # The open stream ends, the idle connection is closed, and nothing listens any more.
        with pytest.raises(aio.AioRpcError) as caught:
            await asyncio.wait_for(watch.read(), 5)
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""
        assert all(refused(port) for port in ports)
    finally:
        idle_writer.close()
        await channel.close()
    await asyncio.sleep(0.1)
    leftover = [t for t in asyncio.all_tasks() - tasks_before if t is not asyncio.current_task()]
    assert leftover == []


async def test_port_in_use_is_reported_and_nothing_is_left_running() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1:{port} \(admin port\)"):
            await start_admin("127.0.0.1", port, health.aio.HealthServicer())


async def test_health_servicer_must_be_grpcs_aio_one() -> None:
    with pytest.raises(TypeError, match="HealthServicer"):
        await start_admin("127.0.0.1", 0, object())  # type: ignore[arg-type]


# Limits (the attack tests against a real process are in test_admin_limits.py)


async def test_refusals_over_the_cap_are_counted_each_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    admin = await start_admin(
        "127.0.0.1", 0, health.aio.HealthServicer(), limits=AdminLimits(max_connections=2)
    )
    before = REGISTRY.get_sample_value("learnmesh_admin_connections_refused_total") or 0.0
    held = [await asyncio.open_connection("127.0.0.1", admin.port) for _ in range(2)]
    try:
        await asyncio.sleep(0.1)
        with caplog.at_level("WARNING", logger="learnmesh.admin"):
            for _ in range(10):
                reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
                with contextlib.suppress(ConnectionResetError):  # closed at once, or reset
                    assert await asyncio.wait_for(reader.read(), 2) == b""
                writer.close()
        after = REGISTRY.get_sample_value("learnmesh_admin_connections_refused_total")
        assert after == before + 10
        lines = [r for r in caplog.records if "cap of 2 open connections" in r.getMessage()]
        assert len(lines) == 1
    finally:
        for _, writer in held:
            writer.close()
        await admin.stop()
