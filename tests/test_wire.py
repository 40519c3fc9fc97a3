"""What a client outside the project sees on the product's own server: reflection (both
versions, over mTLS), undecodable request bytes, a request that never arrives, and every
handler shape grpc allows through the production wiring."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc import aio
from grpc_reflection.v1alpha import reflection_pb2

from interceptors.chain import ServerChain
from interceptors.errors import ErrorMapping
from interceptors.request_id import RequestId
from interceptors.validation import Validation
from learnmesh.file.v1 import file_pb2
from tests.conftest import Mesh, mesh_settings, running_mesh, scratch_database
from tests.support.servers import chain_links

V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
LOGIN = "/learnmesh.auth.v1.AuthService/Login"


async def reflect(channel: aio.Channel, path: str, request: Any) -> Any:
    call = channel.stream_stream(
        path,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    answers = [answer async for answer in call(iter([request]), timeout=5)]
    assert len(answers) == 1
    return answers[0]


@pytest.mark.parametrize("path", [V1, V1ALPHA])
async def test_reflection_lists_services_and_describes_a_method_over_mtls(
    mesh: Mesh, path: str
) -> None:
    assert mesh.settings.tls.enabled
    listed = await reflect(
        mesh.channel, path, reflection_pb2.ServerReflectionRequest(list_services="")
    )
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "learnmesh.auth.v1.AuthService",
        "learnmesh.user.v1.UserService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    described = await reflect(
        mesh.channel,
        path,
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="learnmesh.auth.v1.AuthService"
        ),
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    methods = {
        (f.package, s.name, m.name, m.input_type)
        for f in files
        for s in f.service
        for m in s.method
    }
    assert ("learnmesh.auth.v1", "AuthService", "Login", ".learnmesh.auth.v1.LoginRequest") in (
        methods
    )
    # The v1 service describes itself too (its descriptor is served, not only its name).
    itself = await reflect(
        mesh.channel,
        path,
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="grpc.reflection.v1.ServerReflection"
        ),
    )
    assert itself.WhichOneof("message_response") == "file_descriptor_response"


async def test_undecodable_bytes_are_invalid_argument_inside_the_chain(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    call: Any = mesh.channel.unary_unary(LOGIN)  # raw bytes in, raw bytes out
    with pytest.raises(aio.AioRpcError) as caught:
        await call(b"\x0a\xff\xff\xff\xff\x0f", timeout=5)
    err = caught.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "LoginRequest" in (err.details() or "")
    assert "DecodeError" not in (err.details() or "")
    trailers = dict(err.trailing_metadata() or ())
    assert trailers.get("x-request-id")
    assert "Traceback" not in caplog.text


async def test_a_request_that_never_arrives_ends_at_the_default_deadline(
    tmp_path: Path,
) -> None:
    async with scratch_database("sqlite", tmp_path) as url:
        settings = mesh_settings(tmp_path, url)
        settings = replace(settings, deadlines=replace(settings.deadlines, default=0.5))
        async with running_mesh(settings) as mesh:
            never = asyncio.Event()

            async def nothing() -> AsyncIterator[bytes]:
                await never.wait()
                yield b""

            # A unary method called as a stream that never sends its message (and sets no
            # deadline of its own): the server must end it at its default deadline.
            call: Any = mesh.channel.stream_unary(LOGIN)
            started = time.monotonic()
            with pytest.raises(aio.AioRpcError) as caught:
                await asyncio.wait_for(call(nothing()), timeout=10)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 5
            assert dict(caught.value.trailing_metadata() or ()).get("x-request-id")


async def test_a_short_caller_deadline_still_gets_the_request_id(mesh: Mesh) -> None:
    # The server ends the call just before the caller's deadline, with its trailers.
    async def slow() -> AsyncIterator[bytes]:
        await asyncio.sleep(1)
        yield b""

    call: Any = mesh.channel.stream_unary(LOGIN)
    with pytest.raises(aio.AioRpcError) as caught:
        await call(slow(), timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert dict(caught.value.trailing_metadata() or ()).get("x-request-id")


# --- every handler shape, through ServerChain(links).applied_to(server) --------------------

UPLOAD = "/learnmesh.file.v1.FileService/Upload"
DOWNLOAD = "/learnmesh.file.v1.FileService/Download"
GET = "/learnmesh.file.v1.FileService/GetFile"
_DL = file_pb2.DownloadResponse
_UP = file_pb2.UploadResponse


def _sync_unary(request: Any, context: Any) -> Any:
    return file_pb2.GetFileResponse()


async def _async_unary(request: Any, context: Any) -> Any:
    return file_pb2.GetFileResponse()


def _sync_generator(request: Any, context: Any) -> Iterator[Any]:
    for index in range(3):
        yield _DL(chunk=bytes([index]))


def _sync_iterator(request: Any, context: Any) -> Iterator[Any]:
    return iter([_DL(chunk=bytes([index])) for index in range(3)])


async def _async_generator(request: Any, context: Any) -> AsyncIterator[Any]:
    for index in range(3):
        yield _DL(chunk=bytes([index]))


async def _writer(request: Any, context: Any) -> None:
    for index in range(3):
        await context.write(_DL(chunk=bytes([index])))


def _sync_client_stream(requests: Iterator[Any], context: Any) -> Any:
    return _UP(file=file_pb2.FileInfo(size=sum(len(r.chunk) for r in requests)))


async def _async_client_stream(requests: AsyncIterator[Any], context: Any) -> Any:
    return _UP(file=file_pb2.FileInfo(size=sum([len(r.chunk) async for r in requests])))


def _sync_bidi(requests: Iterator[Any], context: Any) -> Iterator[Any]:
    for request in requests:
        yield _DL(chunk=request.chunk)


async def _async_bidi(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    async for request in requests:
        yield _DL(chunk=request.chunk)


UNARY = [_sync_unary, _async_unary]
SERVER_STREAM = [_sync_generator, _sync_iterator, _async_generator, _writer]
CLIENT_STREAM = [_sync_client_stream, _async_client_stream]
BIDI = [_sync_bidi, _async_bidi]


async def _served(handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> tuple[Any, int]:
    server = aio.server()
    chained = ServerChain(chain_links(RequestId, ErrorMapping, Validation)).applied_to(server)
    chained.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("learnmesh.file.v1.FileService", handlers)]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.mark.parametrize(
    ("unary", "server_stream", "client_stream", "bidi"),
    [(UNARY[i % 2], SERVER_STREAM[i], CLIENT_STREAM[i % 2], BIDI[i % 2]) for i in range(4)],
    ids=["sync-gen", "sync-iter", "async-gen", "writer"],
)
async def test_every_handler_shape_through_the_production_wiring(
    unary: Any, server_stream: Any, client_stream: Any, bidi: Any
) -> None:
    up, down = file_pb2.UploadRequest, file_pb2.DownloadRequest
    server, port = await _served(
        {
            "GetFile": grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=file_pb2.GetFileRequest.FromString,
                response_serializer=file_pb2.GetFileResponse.SerializeToString,
            ),
            "Download": grpc.unary_stream_rpc_method_handler(
                server_stream,
                request_deserializer=down.FromString,
                response_serializer=_DL.SerializeToString,
            ),
            "Upload": grpc.stream_unary_rpc_method_handler(
                client_stream,
                request_deserializer=up.FromString,
                response_serializer=_UP.SerializeToString,
            ),
            # Bidirectional, under a name the descriptor pool does not know.
            "Echo": grpc.stream_stream_rpc_method_handler(
                bidi, request_deserializer=up.FromString, response_serializer=_DL.SerializeToString
            ),
        }
    )
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            got = await channel.unary_unary(
                GET,
                request_serializer=file_pb2.GetFileRequest.SerializeToString,
                response_deserializer=file_pb2.GetFileResponse.FromString,
            )(file_pb2.GetFileRequest(file_id="00000000-0000-4000-8000-000000000000"), timeout=5)
            assert isinstance(got, file_pb2.GetFileResponse)
            chunks = [
                r.chunk
                async for r in channel.unary_stream(
                    DOWNLOAD,
                    request_serializer=down.SerializeToString,
                    response_deserializer=_DL.FromString,
                )(down(file_id="00000000-0000-4000-8000-000000000000"), timeout=5)
            ]
            assert chunks == [b"\x00", b"\x01", b"\x02"]
            uploaded = await channel.stream_unary(
                UPLOAD,
                request_serializer=up.SerializeToString,
                response_deserializer=_UP.FromString,
            )(iter([up(chunk=b"ab"), up(chunk=b"cde")]), timeout=5)
            assert uploaded.file.size == 5
            echoed = [
                r.chunk
                async for r in channel.stream_stream(
                    "/learnmesh.file.v1.FileService/Echo",
                    request_serializer=up.SerializeToString,
                    response_deserializer=_DL.FromString,
                )(iter([up(chunk=b"x"), up(chunk=b"y")]), timeout=5)
            ]
            assert echoed == [b"x", b"y"]
    finally:
        await server.stop(0)
