"""The admin port under attack: a real `learnmesh up` process, real sockets, its own limits.

The port takes no credentials, so whatever a client does there must not starve the process:
connections over the cap are closed at once, half-sent or trickled requests are cut at the
header timeout, idle ones at theirs, and the mTLS port keeps serving meanwhile. The cap and
timeouts are set small here so the attack stays bounded and the test quick.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.test_cli import client_credentials, env_for, health_of, http_status, running

CAP = 8
HEADER_TIMEOUT = 2.0
HTTP_IDLE = 1.0
GRPC_IDLE = 2.0
# Descriptors the process may open beyond one per attacker (the loop, a log line, a probe).
MARGIN = 6
SERVING = health_pb2.HealthCheckResponse.SERVING
HALF_SENT = b"GET /healthz HTTP/1.1\r\nHost: attacker\r\n"  # the blank line never comes
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@dataclass
class Mesh:
    pid: int
    main: str
    admin: int
    credentials: grpc.ChannelCredentials

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    async def main_serving(self) -> bool:
        return await health_of(self.main, "learnmesh.auth.v1.AuthService", self.credentials) == (
            SERVING
        )


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    var_dir = tmp_path_factory.mktemp("var")
    env = env_for(
        var_dir,
        LEARNMESH_SERVER_PORT="0",
        LEARNMESH_SERVER_ADMIN_MAX_CONNECTIONS=str(CAP),
        LEARNMESH_SERVER_ADMIN_SNIFF_TIMEOUT=str(HEADER_TIMEOUT),
        LEARNMESH_SERVER_ADMIN_HEADER_TIMEOUT=str(HEADER_TIMEOUT),
        LEARNMESH_SERVER_ADMIN_HTTP_IDLE_TIMEOUT=str(HTTP_IDLE),
        LEARNMESH_SERVER_ADMIN_GRPC_IDLE_TIMEOUT=str(GRPC_IDLE),
        LEARNMESH_TELEMETRY_ACCESS_LOG="false",
    )
    async with running(["up"], env) as server:
        found = re.search(r"admin: .* plaintext 127\.0\.0\.1:(\d+)", "".join(server.lines))
        assert found is not None
        admin = int(found.group(1))
        yield Mesh(server.proc.pid, server.address, admin, client_credentials(var_dir))


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float | None:
    """Seconds until the server closed the connection (EOF or reset), None if it did not."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return time.monotonic() - started


async def settle(mesh: Mesh, at_most: int, seconds: float = 5.0) -> int:
    """The descriptor count once it is at most ``at_most`` (or what it is after ``seconds``)."""
    count = mesh.descriptors()
    for _ in range(int(seconds / 0.05)):
        if count <= at_most:
            break
        await asyncio.sleep(0.05)
        count = mesh.descriptors()
    return count


async def test_half_sent_requests_are_capped_cut_and_starve_nothing(mesh: Mesh) -> None:
    assert await http_status(mesh.admin, "/healthz") == 200
    baseline = await settle(mesh, 0, seconds=0.5)  # whatever the idle process holds

    attackers = []
    for _ in range(3 * CAP):
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.admin)
        writer.write(HALF_SENT)
        await writer.drain()
        attackers.append((reader, writer))
    started = time.monotonic()
    try:
        # Those over the cap are closed at once; the cap's worth stays open, waiting.
        outcomes = await asyncio.gather(*(closed_within(r, 1.0) for r, _ in attackers))
        assert sum(o is not None for o in outcomes) == 2 * CAP
        held = [attackers[i] for i, o in enumerate(outcomes) if o is None]
        assert len(held) == CAP

        # One descriptor per held attacker (no inner connection yet), plus a margin.
        assert mesh.descriptors() <= baseline + CAP + MARGIN
        # The mTLS port answers real calls all along; the admin port is full meanwhile.
        for _ in range(3):
            assert await mesh.main_serving()
        assert mesh.descriptors() <= baseline + CAP + MARGIN

        # The held ones are cut at the header timeout, counted from their connect.
        cut = await asyncio.gather(*(closed_within(r, HEADER_TIMEOUT + 3) for r, _ in held))
        assert all(c is not None for c in cut), cut
        elapsed = time.monotonic() - started
        assert HEADER_TIMEOUT - 1.2 <= elapsed <= HEADER_TIMEOUT + 3
    finally:
        for _, writer in attackers:
            writer.close()

    assert await http_status(mesh.admin, "/healthz") == 200
    assert await settle(mesh, baseline + MARGIN) <= baseline + MARGIN


async def test_connections_over_the_cap_of_every_kind_are_refused_at_once(mesh: Mesh) -> None:
    # Silent connections (no protocol said yet) count against the cap as well.
    silent = [await asyncio.open_connection("127.0.0.1", mesh.admin) for _ in range(CAP)]
    try:
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.admin)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: probe\r\n\r\n")
        assert await closed_within(reader, 1.0) is not None
        writer.close()
        assert await mesh.main_serving()
        # Cut at the sniff timeout, then the port answers again.
        cut = await asyncio.gather(*(closed_within(r, HEADER_TIMEOUT + 3) for r, _ in silent))
        assert all(c is not None for c in cut)
    finally:
        for _, writer in silent:
            writer.close()
    assert await http_status(mesh.admin, "/healthz") == 200


async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float) -> None:
    """Sends ``data`` one byte at a time (a slowloris), until the server cuts it."""
    try:
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(every)
    except ConnectionError:
        pass


SLOW_HEAD = b"GET /healthz HTTP/1.1\r\nHost: slow\r\n" + b"X-Pad: " + b"a" * 200 + b"\r\n\r\n"


async def test_slowloris_on_the_first_request_is_cut(mesh: Mesh) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.admin)
    sender = asyncio.create_task(trickle(writer, SLOW_HEAD, 0.1))
    try:
        after = await closed_within(reader, HEADER_TIMEOUT + 3)
        assert after is not None and HEADER_TIMEOUT - 0.5 <= after <= HEADER_TIMEOUT + 1.5
    finally:
        sender.cancel()
        writer.close()


async def test_slowloris_on_a_keep_alive_connection_is_cut(mesh: Mesh) -> None:
    """After one whole request, the next one trickled: uvicorn alone would wait forever
    (its keep-alive timer stops at the first byte), the protocol's header timer cuts it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.admin)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: probe\r\n\r\n")
        await writer.drain()
        reply = await asyncio.wait_for(reader.readuntil(b'{"status":"alive"}'), 5)
        assert reply.startswith(b"HTTP/1.1 200 OK")
        started = time.monotonic()
        sender = asyncio.create_task(trickle(writer, SLOW_HEAD, 0.1))
        after = await closed_within(reader, HEADER_TIMEOUT + 3)
        sender.cancel()
        assert after is not None
        # Longer than the keep-alive idle timeout (bytes kept coming), cut at the header one.
        assert HEADER_TIMEOUT - 0.5 <= time.monotonic() - started <= HEADER_TIMEOUT + 1.5
    finally:
        writer.close()


async def test_idle_keep_alive_connection_is_closed(mesh: Mesh) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.admin)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: probe\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.readuntil(b'{"status":"alive"}'), 5)
        after = await closed_within(reader, HTTP_IDLE + 3)
        assert after is not None and after >= HTTP_IDLE - 0.3
    finally:
        writer.close()


async def test_grpc_connection_carrying_nothing_is_closed(mesh: Mesh) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.admin)
    try:
        writer.write(HTTP2_PREFACE + EMPTY_SETTINGS)
        await writer.drain()
        after = await closed_within(reader, GRPC_IDLE + 4)
        assert after is not None and after >= GRPC_IDLE - 0.5
    finally:
        writer.close()


async def test_quiet_watch_outlives_the_grpc_idle_timeout(mesh: Mesh) -> None:
    """A call is not idleness: a Watch that hears nothing for longer stays open."""
    async with aio.insecure_channel(f"127.0.0.1:{mesh.admin}") as channel:
        # grpc_health's stubs declare no HealthStub methods
        stub: Any = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING
        await asyncio.sleep(GRPC_IDLE * 2)
        assert not watch.done()
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == SERVING
        watch.cancel()


def test_admin_limits_are_validated_at_start(tmp_path: Path) -> None:
    from learnmesh import config
    from learnmesh.admin import AdminLimits

    with pytest.raises(config.ConfigError, match="LEARNMESH_SERVER_ADMIN_MAX_CONNECTIONS"):
        config.load(env={"LEARNMESH_SERVER_ADMIN_MAX_CONNECTIONS": "0"})
    with pytest.raises(config.ConfigError, match="LEARNMESH_SERVER_ADMIN_HEADER_TIMEOUT"):
        config.load(env={"LEARNMESH_SERVER_ADMIN_HEADER_TIMEOUT": "-1"})
    with pytest.raises(ValueError, match="grpc_idle_timeout"):
        AdminLimits(grpc_idle_timeout=0)
    defaults = config.load(env={}).server
    assert (defaults.admin_max_connections, defaults.admin_header_timeout) == (64, 5.0)
