"""A service process killed with SIGKILL after committing an event, before any consumer had
it: the event waits in the outbox and is applied once after the restart (`learnmesh` as an
operator runs it, real processes sharing one SQLite database)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sqlite3
import sys
from pathlib import Path

from grpc import aio

from learnmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from learnmesh.user.v1 import user_pb2, user_pb2_grpc
from tests.conftest import PASSWORD, bearer
from tests.support.mesh import new_email
from tests.support.processes import server_process

LEARNMESH = [sys.executable, "-m", "learnmesh.cli"]
READY = re.compile(r"^ready")
SERVICE_PORT = re.compile(r"grpc \(PLAINTEXT\) 127\.0\.0\.1:(\d+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def env_for(var_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEARNMESH_")}
    env.update(LEARNMESH_VAR_DIR=str(var_dir), LEARNMESH_SERVER_ADMIN_PORT="-1", **extra)
    return env


def query(var_dir: Path, sql: str, *params: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(var_dir / "learnmesh.db") as db:
        return list(db.execute(sql, params))


async def register(address: str, email: str) -> auth_pb2.RegisterResponse:
    async with aio.insecure_channel(address) as channel:
        response: auth_pb2.RegisterResponse = await auth_pb2_grpc.AuthServiceStub(channel).Register(
            auth_pb2.RegisterRequest(
                email=email, password=PASSWORD, display_name="Crash Test", accepted_terms=True
            ),
            timeout=20,
        )
        return response


async def test_a_user_deleted_committed_before_a_sigkill_is_applied_once_after_restart(
    tmp_path: Path,
) -> None:
    auth_port, user_port = free_port(), free_port()
    split = {
        "LEARNMESH_AUTH_ADDRESS": f"127.0.0.1:{auth_port}",
        "LEARNMESH_USER_ADDRESS": f"127.0.0.1:{user_port}",
    }
    email = new_email("crash")
    # auth and user in processes of their own, each with its in-process bus: the user
    # service's events reach no consumer of the auth service's.
    auth_cmd = [*LEARNMESH, "serve", "auth", "--insecure", "--port", str(auth_port)]
    user_cmd = [*LEARNMESH, "serve", "user", "--insecure", "--port", str(user_port)]
    env = env_for(tmp_path, **split)
    async with server_process(
        auth_cmd, env=env, ready=READY, port=SERVICE_PORT, merge_stderr=True
    ) as auth:
        async with server_process(
            user_cmd, env=env, ready=READY, port=SERVICE_PORT, merge_stderr=True
        ) as user:
            first = await register(auth.address, email)
            async with aio.insecure_channel(user.address) as channel:
                await user_pb2_grpc.UserServiceStub(channel).DeleteUser(
                    user_pb2.DeleteUserRequest(user_id=first.user.id),
                    metadata=bearer(first.access_token),
                    timeout=20,
                )
            user.proc.send_signal(signal.SIGKILL)
            await user.proc.wait()
        await asyncio.sleep(1.0)
        # Nothing consumed it: the account is still there, and its email taken.
        assert query(
            tmp_path, "SELECT count(*) FROM auth_credentials WHERE user_id = ?", first.user.id
        ) == [(1,)]
        await auth.stop()
    (event_id,) = [
        str(row[0])
        for row in query(
            tmp_path,
            "SELECT id FROM user_outbox WHERE subject = ? AND type = 'user.deleted'",
            first.user.id,
        )
    ]

    # The whole mesh restarts in one process: the user relay publishes again what its
    # outbox keeps, the auth consumer applies the deletion, once.
    for restart in range(2):
        async with server_process(
            [*LEARNMESH, "up", "--insecure", "--port", "0"],
            env=env_for(tmp_path),
            ready=READY,
            port=SERVICE_PORT,
            merge_stderr=True,
        ) as up:
            for _ in range(200):
                applied = query(
                    tmp_path,
                    "SELECT count(*) FROM auth_processed_events WHERE event_id = ?",
                    event_id,
                )
                if applied == [(1,)]:
                    break
                await asyncio.sleep(0.05)
            assert applied == [(1,)]
            if restart == 0:
                again = await register(up.address, email)
                assert again.user.id != first.user.id
            else:
                # Published again at this start too, and skipped: the new account stays.
                await asyncio.sleep(1.0)
                async with aio.insecure_channel(up.address) as channel:
                    await auth_pb2_grpc.AuthServiceStub(channel).Login(
                        auth_pb2.LoginRequest(email=email, password=PASSWORD), timeout=20
                    )
            out, _ = await up.stop()
            assert up.proc.returncode == 0, out
    assert query(tmp_path, "SELECT count(*) FROM auth_audit WHERE event = 'account.forgotten'") == [
        (1,)
    ]
