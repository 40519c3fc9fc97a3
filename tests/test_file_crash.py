"""A mesh process killed with SIGKILL in the middle of an upload: after the restart nothing of
that upload is left, neither in storage (its temporary file included) nor in the table
(`learnmesh up` as an operator runs it, in a process of its own, on SQLite)."""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from grpc import aio

from learnmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from learnmesh.file.v1 import file_pb2, file_pb2_grpc
from tests.conftest import PASSWORD, bearer
from tests.support.files import png_bytes, upload_stream
from tests.support.mesh import new_email
from tests.support.processes import server_process
from tests.test_events_crash import env_for, free_port

LEARNMESH = [sys.executable, "-m", "learnmesh.cli"]
READY = re.compile(r"^ready")
SERVICE_PORT = re.compile(r"grpc \(PLAINTEXT\) 127\.0\.0\.1:(\d+)")
MIB = 1024 * 1024


def rows(var_dir: Path) -> int:
    with sqlite3.connect(var_dir / "learnmesh.db") as db:
        return int(db.execute("SELECT count(*) FROM file_files").fetchone()[0])


def left_in_storage(var_dir: Path) -> list[Path]:
    root = var_dir / "files"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


async def test_a_process_killed_mid_upload_leaves_nothing_after_restart(tmp_path: Path) -> None:
    port = free_port()
    command = [*LEARNMESH, "up", "--insecure", "--port", str(port)]
    env = env_for(tmp_path, LEARNMESH_DATABASE_URL="")
    async with (
        server_process(command, env=env, ready=READY, port=SERVICE_PORT, merge_stderr=True) as mesh,
        aio.insecure_channel(mesh.address) as channel,
    ):
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        email = new_email("crash")
        await auth.Register(
            auth_pb2.RegisterRequest(
                email=email, password=PASSWORD, display_name="Crash Test", accepted_terms=True
            )
        )
        login = await auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
        me = bearer(login.access_token)
        halfway = asyncio.Event()

        async def stalled() -> AsyncIterator[file_pb2.UploadRequest]:
            data = png_bytes(3 * MIB)
            for i, message in enumerate(
                upload_stream(data, size=4 * MIB, purpose=file_pb2.PURPOSE_AVATAR)
            ):
                yield message
                if i == 30:
                    halfway.set()
                    await asyncio.sleep(60)

        # An avatar: the one purpose a free account may upload.
        call = file_pb2_grpc.FileServiceStub(channel).Upload(stalled(), metadata=me)
        await halfway.wait()
        for _ in range(50):  # the bytes so far have reached the storage's temporary file
            if left_in_storage(tmp_path):
                break
            await asyncio.sleep(0.1)
        assert left_in_storage(tmp_path), "the upload never reached the storage"
        await mesh.stop(signal.SIGKILL)
        call.cancel()
    assert rows(tmp_path) == 0

    async with server_process(
        command, env=env, ready=READY, port=SERVICE_PORT, merge_stderr=True
    ) as restarted:
        for _ in range(50):
            if not left_in_storage(tmp_path):
                break
            await asyncio.sleep(0.1)
        assert left_in_storage(tmp_path) == []
        assert rows(tmp_path) == 0
        await restarted.stop()
