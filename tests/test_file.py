"""FileService over real channels (mTLS) on SQLite and PostgreSQL: streamed uploads and
downloads, every refusal leaving nothing in storage or the table, owners, tiers and quotas,
deletion, avatars, and the user service's user.deleted."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio

from learnmesh import cli
from learnmesh.auth.v1 import auth_pb2
from learnmesh.file.v1 import file_pb2
from learnmesh.user.v1 import user_pb2
from tests.conftest import ADMIN_EMAIL, PASSWORD, Mesh, bearer
from tests.support.courses import Account
from tests.support.files import (
    CHUNK,
    ELF,
    Pulled,
    file_mesh,
    file_rows,
    files,
    generated_stream,
    partial_files,
    pdf_bytes,
    png_bytes,
    refused_upload,
    rss_kib,
    stored_keys,
    upload_stream,
)
from tests.support.mesh import new_email, outbox_events, wait_until
from tests.support.status import error_reason, refused, retry_delay, violations

MIB = 1024 * 1024


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
async def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    tmp = tmp_path_factory.mktemp(f"file-{request.param}")
    async for m in file_mesh(
        request.param, tmp, basic_uploads_per_hour=3, storage_quota_bytes=80 * MIB
    ):
        yield m


async def user_with_tier(mesh: Mesh, tier: str, name: str = "File User") -> Account:
    """A user of ``tier``, signed in again so that the access token carries it."""
    email = new_email(tier)
    registered = await mesh.register(email, name=name)
    if tier != "free":
        await cli.set_tier(mesh.settings, email, tier)  # as `learnmesh users set-tier` does
    login = await mesh.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
    return Account(registered.user.id, email, bearer(login.access_token))


@pytest.fixture(scope="module")
async def pro(mesh: Mesh) -> Account:
    return await user_with_tier(mesh, "pro", "Pro User")


async def assert_nothing_left(mesh: Mesh, owner: Account, keys_before: list[str]) -> None:
    assert await stored_keys(mesh) == keys_before
    assert await partial_files(mesh) == []
    assert await file_rows(mesh, owner.user_id) == 0


async def download(mesh: Mesh, who: Account, file_id: str) -> tuple[file_pb2.FileInfo, bytes]:
    call = files(mesh).Download(file_pb2.DownloadRequest(file_id=file_id), metadata=who.metadata)
    first = await call.read()
    assert isinstance(first, file_pb2.DownloadResponse) and first.HasField("file")
    parts = []
    while (message := await call.read()) is not aio.EOF:
        assert isinstance(message, file_pb2.DownloadResponse)
        parts.append(message.chunk)
    return first.file, b"".join(parts)


async def test_an_upload_downloads_byte_identical(mesh: Mesh) -> None:
    owner = await user_with_tier(mesh, "pro")
    data = png_bytes(5 * MIB)
    response = await files(mesh).Upload(upload_stream(data), metadata=owner.metadata)
    info = response.file
    assert (info.size, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert (info.content_type, info.owner_id) == ("image/png", owner.user_id)
    assert info.purpose == file_pb2.PURPOSE_COURSE_MATERIAL

    got, body = await download(mesh, owner, info.id)
    assert got == info
    assert body == data
    fetched = await files(mesh).GetFile(
        file_pb2.GetFileRequest(file_id=info.id), metadata=owner.metadata
    )
    assert fetched.file == info
    [event] = await outbox_events(mesh, "file", info.id)
    assert event.type == "file.uploaded"


async def test_a_50_mib_upload_does_not_grow_the_server_by_its_size(mesh: Mesh) -> None:
    owner = await user_with_tier(mesh, "pro")
    messages, hasher = generated_stream(50 * MIB)
    await asyncio.sleep(0)
    before = rss_kib()
    response = await files(mesh).Upload(messages, metadata=owner.metadata)
    grown = rss_kib() - before
    assert response.file.sha256 == hasher.hexdigest()
    assert grown < 20 * 1024, f"the process grew by {grown} KiB"
    await files(mesh).DeleteFile(
        file_pb2.DeleteFileRequest(file_id=response.file.id), metadata=owner.metadata
    )


async def test_a_slow_reader_does_not_make_the_server_buffer_the_file(mesh: Mesh) -> None:
    owner = await user_with_tier(mesh, "pro")
    messages, _ = generated_stream(60 * MIB)
    info = (await files(mesh).Upload(messages, metadata=owner.metadata)).file
    before = rss_kib()
    call = files(mesh).Download(file_pb2.DownloadRequest(file_id=info.id), metadata=owner.metadata)
    for _ in range(3):  # the FileInfo and two chunks, then the reader stalls
        assert await call.read() is not aio.EOF
    await asyncio.sleep(1.5)
    grown = rss_kib() - before
    assert grown < 20 * 1024, f"the process grew by {grown} KiB while the reader stalled"
    received = 2 * 256 * 1024
    while (message := await call.read()) is not aio.EOF:
        assert isinstance(message, file_pb2.DownloadResponse)
        received += len(message.chunk)
    assert received == 60 * MIB


async def test_refused_uploads_leave_nothing(mesh: Mesh) -> None:
    owner = await user_with_tier(mesh, "pro")
    before = await stored_keys(mesh)
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    # Declared over the purpose's limit: refused at the header, before the body is read.
    pulled = Pulled()
    err = await refused_upload(
        mesh,
        owner.metadata,
        upload_stream(png_bytes(6 * MIB), purpose=file_pb2.PURPOSE_AVATAR, pulled=pulled),
        invalid,
    )
    assert "header.size" in violations(err)
    assert pulled.chunks < 6 * MIB // CHUNK // 2
    # More bytes than declared: refused when they cross the declared size.
    pulled = Pulled()
    err = await refused_upload(
        mesh,
        owner.metadata,
        upload_stream(png_bytes(32 * MIB), size=1 * MIB, pulled=pulled),
        invalid,
    )
    assert "header.size" in violations(err)
    # (gRPC's flow-control window lets the client send some MiB ahead of the server.)
    assert pulled.chunks < 32 * MIB // CHUNK // 2
    # Fewer bytes than declared.
    data = png_bytes(300_000)
    err = await refused_upload(
        mesh, owner.metadata, upload_stream(data, size=len(data) + 1), invalid
    )
    assert "header.size" in violations(err)
    # The wrong checksum.
    err = await refused_upload(mesh, owner.metadata, upload_stream(data, sha256="0" * 64), invalid)
    assert "header.sha256" in violations(err)
    # A PNG declared as a PDF; an executable declared as an image; a type not allowed.
    for body, declared in (
        (png_bytes(100_000), "application/pdf"),
        (ELF + bytes(100_000), "image/png"),
        (pdf_bytes(100_000), "application/x-msdownload"),
        (b"just some text", "image/png"),
    ):
        err = await refused_upload(
            mesh, owner.metadata, upload_stream(body, content_type=declared), invalid
        )
        assert "header.content_type" in violations(err), declared
    # No header first; a second header.
    err = await refused_upload(
        mesh, owner.metadata, iter([file_pb2.UploadRequest(chunk=b"abc")]), invalid
    )
    assert "header" in violations(err)
    twice = list(upload_stream(data))
    err = await refused_upload(mesh, owner.metadata, iter(twice[:2] + twice[:1]), invalid)
    assert "header" in violations(err)
    await assert_nothing_left(mesh, owner, before)


async def test_an_upload_cancelled_midway_leaves_nothing(mesh: Mesh) -> None:
    owner = await user_with_tier(mesh, "pro")
    before = await stored_keys(mesh)
    sent = asyncio.Event()

    async def slow() -> AsyncIterator[file_pb2.UploadRequest]:
        data = png_bytes(4 * MIB)
        for i, message in enumerate(upload_stream(data, size=40 * MIB)):
            yield message
            if i == 20:
                sent.set()
                await asyncio.sleep(30)

    call = files(mesh).Upload(slow(), metadata=owner.metadata)
    await sent.wait()
    await asyncio.sleep(0.3)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    async def cleaned() -> bool:
        return await stored_keys(mesh) == before and await partial_files(mesh) == []

    await wait_until(cleaned, within=10)
    assert await file_rows(mesh, owner.user_id) == 0


async def test_only_the_owner_or_an_admin_reaches_a_file(mesh: Mesh, pro: Account) -> None:
    info = (await files(mesh).Upload(upload_stream(png_bytes(50_000)), metadata=pro.metadata)).file
    other = await user_with_tier(mesh, "pro")
    stub = files(mesh)
    denied = grpc.StatusCode.PERMISSION_DENIED
    await refused(
        stub.GetFile(file_pb2.GetFileRequest(file_id=info.id), metadata=other.metadata), denied
    )
    call = stub.Download(file_pb2.DownloadRequest(file_id=info.id), metadata=other.metadata)
    await refused(call.read(), denied)
    await refused(
        stub.DeleteFile(file_pb2.DeleteFileRequest(file_id=info.id), metadata=other.metadata),
        denied,
    )
    err = await refused(
        stub.GetFile(file_pb2.GetFileRequest(file_id="../../etc/passwd"), metadata=other.metadata),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "file_id" in violations(err)
    admin = await mesh.register(ADMIN_EMAIL)
    as_admin = bearer(admin.access_token)
    assert (
        await stub.GetFile(file_pb2.GetFileRequest(file_id=info.id), metadata=as_admin)
    ).file == info

    # The owner deletes it: row and object go; again is NOT_FOUND.
    keys = await stored_keys(mesh)
    await stub.DeleteFile(file_pb2.DeleteFileRequest(file_id=info.id), metadata=pro.metadata)
    assert await stored_keys(mesh) == [k for k in keys if not k.endswith(info.id)]
    await refused(
        stub.DeleteFile(file_pb2.DeleteFileRequest(file_id=info.id), metadata=pro.metadata),
        grpc.StatusCode.NOT_FOUND,
    )
    assert [e.type for e in await outbox_events(mesh, "file", info.id)] == [
        "file.uploaded",
        "file.deleted",
    ]


async def test_tiers_and_quotas_refuse_with_a_reason(mesh: Mesh) -> None:
    stub = files(mesh)
    free = await user_with_tier(mesh, "free")
    before = await stored_keys(mesh)
    err = await refused_upload(
        mesh,
        free.metadata,
        upload_stream(
            pdf_bytes(10_000),
            content_type="application/pdf",
            purpose=file_pb2.PURPOSE_ATTACHMENT,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error_reason(err) == "UPLOADS_NOT_IN_TIER"
    await assert_nothing_left(mesh, free, before)
    # Every tier may upload avatars.
    avatar = await stub.Upload(
        upload_stream(png_bytes(20_000), purpose=file_pb2.PURPOSE_AVATAR), metadata=free.metadata
    )
    assert avatar.file.purpose == file_pb2.PURPOSE_AVATAR

    # basic: 3 uploads an hour (this mesh's setting), raced: exactly 3 get through.
    basic = await user_with_tier(mesh, "basic")
    results = await asyncio.gather(
        *(stub.Upload(upload_stream(png_bytes(30_000)), metadata=basic.metadata) for _ in range(6)),
        return_exceptions=True,
    )
    done = [r for r in results if isinstance(r, file_pb2.UploadResponse)]
    limited = [r for r in results if isinstance(r, aio.AioRpcError)]
    assert len(done) == 3
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in limited)
    assert all(error_reason(e) == "UPLOAD_LIMIT" and 0 < retry_delay(e) <= 3600 for e in limited)
    assert await file_rows(mesh, basic.user_id) == 3
    # Deleting an upload does not give the hour's slot back.
    await stub.DeleteFile(
        file_pb2.DeleteFileRequest(file_id=done[0].file.id), metadata=basic.metadata
    )
    await refused_upload(
        mesh, basic.metadata, upload_stream(png_bytes(30_000)), grpc.StatusCode.RESOURCE_EXHAUSTED
    )

    # The storage quota (80 MiB on this mesh) holds for everything a user keeps.
    heavy = await user_with_tier(mesh, "pro")
    await stub.Upload(upload_stream(png_bytes(60 * MIB), chunk=MIB), metadata=heavy.metadata)
    keys = await stored_keys(mesh)
    err = await refused_upload(
        mesh,
        heavy.metadata,
        upload_stream(png_bytes(30 * MIB), chunk=MIB),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error_reason(err) == "STORAGE_QUOTA"
    assert await stored_keys(mesh) == keys


async def test_an_avatar_upload_becomes_the_profile_picture(mesh: Mesh) -> None:
    user = await user_with_tier(mesh, "free")
    stub = files(mesh)
    avatar = await stub.Upload(
        upload_stream(png_bytes(10_000), purpose=file_pb2.PURPOSE_AVATAR), metadata=user.metadata
    )
    updated = await mesh.user.SetAvatar(
        user_pb2.SetAvatarRequest(file_id=avatar.file.id), metadata=user.metadata
    )
    assert updated.user.avatar_url == f"/api/v1/files/{avatar.file.id}/content"
    # The avatar file deleted: the profile's avatar goes too (file.deleted).
    second = await stub.Upload(
        upload_stream(png_bytes(10_000), purpose=file_pb2.PURPOSE_AVATAR), metadata=user.metadata
    )
    await mesh.user.SetAvatar(
        user_pb2.SetAvatarRequest(file_id=second.file.id), metadata=user.metadata
    )
    await stub.DeleteFile(
        file_pb2.DeleteFileRequest(file_id=avatar.file.id), metadata=user.metadata
    )  # no longer the avatar: nothing changes
    await stub.DeleteFile(
        file_pb2.DeleteFileRequest(file_id=second.file.id), metadata=user.metadata
    )

    async def cleared() -> bool:
        me = await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=user.metadata)
        return me.user.avatar_url == ""

    await wait_until(cleared)
    changes = [e.type for e in await outbox_events(mesh, "user", user.user_id)]
    assert changes.count("user.updated") == 3  # two avatars set, one cleared
    pro = await user_with_tier(mesh, "pro")
    material = await stub.Upload(upload_stream(png_bytes(10_000)), metadata=pro.metadata)
    err = await refused(
        mesh.user.SetAvatar(
            user_pb2.SetAvatarRequest(file_id=material.file.id), metadata=pro.metadata
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error_reason(err) == "NOT_AN_AVATAR"
    # Someone else's avatar is not yours to use.
    await refused(
        mesh.user.SetAvatar(
            user_pb2.SetAvatarRequest(file_id=avatar.file.id), metadata=pro.metadata
        ),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_a_deleted_users_files_go(mesh: Mesh) -> None:
    user = await user_with_tier(mesh, "pro")
    info = (await files(mesh).Upload(upload_stream(png_bytes(40_000)), metadata=user.metadata)).file
    await mesh.user.DeleteUser(
        user_pb2.DeleteUserRequest(user_id=user.user_id), metadata=user.metadata
    )

    async def gone() -> bool:
        return await file_rows(mesh, user.user_id) == 0

    await wait_until(gone)
    sweeper = mesh.server.servicers["file"].sweeper
    await sweeper.sweep()  # the first pass only suspects the orphan
    assert any(k.endswith(info.id) for k in await stored_keys(mesh))
    await sweeper.sweep()
    assert not any(k.endswith(info.id) for k in await stored_keys(mesh))
