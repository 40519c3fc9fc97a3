"""Helpers of the file tests: a mesh with the file service, uploads as streams, and what is
left in storage and in the table afterwards."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import text

from learnmesh import tls
from learnmesh.config import FileSettings
from learnmesh.file.v1 import file_pb2, file_pb2_grpc
from tests.conftest import Mesh, mesh_settings, running_mesh, scratch_database
from tests.support.authority import Authority

SERVICES = ("auth", "user", "file")
CHUNK = 64 * 1024
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"
ELF = b"\x7fELF\x02\x01\x01\x00"


def png_bytes(size: int) -> bytes:
    return (PNG + os.urandom(size))[:size]


def pdf_bytes(size: int) -> bytes:
    return (PDF + os.urandom(size))[:size]


async def file_mesh(backend: str, tmp: Path, **file_settings: Any) -> AsyncIterator[Mesh]:
    """Auth, user and file in one process (mTLS) on ``backend``; ``file_settings`` override
    FileSettings."""
    async with scratch_database(backend, tmp) as url:
        settings = replace(mesh_settings(tmp, url), file=replace(FileSettings(), **file_settings))
        async with running_mesh(settings, SERVICES) as mesh:
            yield mesh


def files(mesh: Mesh) -> file_pb2_grpc.FileServiceStub:
    return file_pb2_grpc.FileServiceStub(mesh.channel)


@dataclass
class Pulled:
    """How many chunk messages the client's stream handed to gRPC so far."""

    chunks: int = 0


def upload_stream(
    data: bytes,
    *,
    content_type: str = "image/png",
    purpose: file_pb2.Purpose.ValueType = file_pb2.PURPOSE_COURSE_MATERIAL,
    size: int | None = None,
    sha256: str | None = None,
    filename: str = "picture.png",
    chunk: int = CHUNK,
    pulled: Pulled | None = None,
) -> Iterator[file_pb2.UploadRequest]:
    """The messages of an upload: the header (size and SHA-256 of ``data`` unless given),
    then ``data`` in chunks of ``chunk`` bytes."""
    yield file_pb2.UploadRequest(
        header=file_pb2.UploadHeader(
            filename=filename,
            content_type=content_type,
            size=len(data) if size is None else size,
            sha256=hashlib.sha256(data).hexdigest() if sha256 is None else sha256,
            purpose=purpose,
        )
    )
    for start in range(0, len(data), chunk):
        if pulled is not None:
            pulled.chunks += 1
        yield file_pb2.UploadRequest(chunk=data[start : start + chunk])


def generated_stream(
    total: int, *, purpose: file_pb2.Purpose.ValueType = file_pb2.PURPOSE_COURSE_MATERIAL
) -> tuple[Iterator[file_pb2.UploadRequest], Any]:
    """An upload of ``total`` PNG-looking bytes made chunk by chunk (never whole in memory);
    returns the messages and a hasher that holds the SHA-256 once they are all sent."""
    hasher = hashlib.sha256()

    def messages() -> Iterator[file_pb2.UploadRequest]:
        yield file_pb2.UploadRequest(
            header=file_pb2.UploadHeader(
                filename="big.png", content_type="image/png", size=total, purpose=purpose
            )
        )
        sent = 0
        while sent < total:
            piece = os.urandom(min(CHUNK * 16, total - sent))
            if sent == 0:
                piece = PNG + piece[len(PNG) :]
            hasher.update(piece)
            sent += len(piece)
            yield file_pb2.UploadRequest(chunk=piece)

    return messages(), hasher


async def stored_keys(mesh: Mesh) -> list[str]:
    servicer = mesh.server.servicers["file"]
    keys: list[str] = await servicer.uploads.storage.keys()
    return keys


async def partial_files(mesh: Mesh) -> list[Path]:
    root = Path(mesh.settings.var_dir) / "files" / ".partial"
    return sorted(root.iterdir()) if root.exists() else []


async def file_rows(mesh: Mesh, owner_id: str | None = None) -> int:
    query = "SELECT count(*) FROM file_files" + (" WHERE owner_id = :o" if owner_id else "")
    async with mesh.runtime.db.transaction() as session:
        found = await session.scalar(text(query), {"o": owner_id} if owner_id else {})
    return int(found or 0)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


async def refused_upload(
    mesh: Mesh,
    metadata: Any,
    messages: Iterator[file_pb2.UploadRequest],
    code: grpc.StatusCode,
) -> Any:
    """Sends an upload the server must refuse, with grpcio's blocking client in a thread,
    and returns its error, failing unless it ended with ``code``.

    grpc.aio's client can report INTERNAL ("Failed execute_batch") instead of the server's
    status when the server ends a client stream while the client is still writing
    (grpc/grpc#36066); its blocking client, like other languages' clients, reports the
    server's status."""
    ca = Authority(tls.certs_dir(mesh.settings), mesh.settings.tls.trust_domain)
    credentials = ca.channel_credentials("tests", "client")

    def call() -> grpc.RpcError:
        with grpc.secure_channel(mesh.server.address, credentials) as channel:
            # The generated stubs are typed for grpc.aio; the blocking channel works the same.
            stub = file_pb2_grpc.FileServiceStub(channel)  # type: ignore[arg-type]
            try:
                stub.Upload(messages, metadata=metadata, timeout=60)
            except grpc.RpcError as exc:
                return exc
        raise AssertionError("the upload was accepted")

    err = await asyncio.to_thread(call)
    assert err.code() == code, (err.code(), err.details())
    return err
