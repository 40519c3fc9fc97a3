"""Stopping `learnmesh up` as an operator or a supervisor does: a real process, signals.

Every stop must end with exit code 0 and nothing on the output that says something was
left open or cut mid-way (a task destroyed pending, a traceback, an exception ignored) —
after serving, with probes in flight at the signal, and with a signal during start-up.
The defect this guards against was intermittent, so each case runs several cycles.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.test_cli import env_for, http_status

LEARNMESH = [sys.executable, "-m", "learnmesh.cli"]
LEFT_OPEN = ("Task was destroyed", "Traceback", "Exception ignored", "never awaited")
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def start(var_dir: Path) -> asyncio.subprocess.Process:
    env = env_for(var_dir, LEARNMESH_SERVER_PORT="0", LEARNMESH_SERVER_GRACE="2")
    return await asyncio.create_subprocess_exec(
        *LEARNMESH,
        "up",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def read_until(proc: asyncio.subprocess.Process, marker: bytes) -> bytes:
    """The output up to and including the first line starting with ``marker``."""
    out = b""
    async with asyncio.timeout(60):
        while True:
            line = await proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise AssertionError("exited early:\n" + out.decode())
            out += line
            if line.startswith(marker):
                return out


async def stopped(proc: asyncio.subprocess.Process, sig: int, out: bytes) -> str:
    """Sends ``sig``, waits for the exit; the whole output, checked for a clean stop."""
    proc.send_signal(sig)
    try:
        rest, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = (out + rest).decode()
    assert proc.returncode == 0, text
    for sign in LEFT_OPEN:
        assert sign not in text, text
    assert "stopped" in text.splitlines(), text
    return text


def admin_port(banner: bytes) -> int:
    found = re.search(rb"admin: .* plaintext 127\.0\.0\.1:(\d+)", banner)
    assert found is not None, banner
    return int(found.group(1))


async def probe_forever(port: int) -> None:
    """/readyz again and again (each one checks the database), as a busy balancer would."""
    while True:
        try:
            await asyncio.gather(*(http_status(port, "/readyz") for _ in range(3)))
        except (OSError, IndexError, ValueError):
            await asyncio.sleep(0.01)  # the port is closing or closed


async def statuses_until_the_end(watch: Any) -> tuple[list[int], grpc.StatusCode | None]:
    """The statuses a Watch reports until its stream ends, and the code it ends with."""
    seen = []
    try:
        while (reply := await asyncio.wait_for(watch.read(), 30)) is not aio.EOF:
            seen.append(reply.status)
    except aio.AioRpcError as exc:
        return seen, exc.code()
    return seen, None


@pytest.mark.parametrize(
    "signals", [(signal.SIGTERM, signal.SIGINT, signal.SIGTERM, signal.SIGINT)]
)
async def test_stop_after_serving_is_clean_every_time(
    tmp_path: Path, signals: tuple[int, ...]
) -> None:
    for cycle, sig in enumerate(signals):
        proc = await start(tmp_path / f"var{cycle}")
        banner = await read_until(proc, b"ready")
        port = admin_port(banner)
        assert await http_status(port, "/readyz") == 200
        probes = asyncio.create_task(probe_forever(port))
        await asyncio.sleep(0.3)  # probes in flight when the signal comes
        try:
            text = await stopped(proc, sig, banner)
        finally:
            probes.cancel()
            await asyncio.gather(probes, return_exceptions=True)
        assert "stopping…" in text


async def test_health_turns_not_serving_while_the_admin_port_still_answers(
    tmp_path: Path,
) -> None:
    """The drain comes first: a probe watching through the admin port sees NOT_SERVING
    before its stream ends (the admin port closes only after the server has stopped)."""
    proc = await start(tmp_path)
    banner = await read_until(proc, b"ready")
    async with aio.insecure_channel(f"127.0.0.1:{admin_port(banner)}") as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        seen, ended = await statuses_until_the_end(watch)
        assert NOT_SERVING in seen
        assert ended in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    await stopped(proc, signal.SIGTERM, banner)  # a second signal while stopping is harmless


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_during_start_up_ends_cleanly(tmp_path: Path, sig: int) -> None:
    """The signal comes with the first line the process writes (its migrations running):
    start-up finishes the step under way, then everything opened is closed."""
    for cycle in range(2):
        proc = await start(tmp_path / f"var{cycle}")
        first = await read_until(proc, b"")
        text = await stopped(proc, sig, first)
        assert "stopping…" in text.splitlines()
