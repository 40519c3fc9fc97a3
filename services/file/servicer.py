"""FileService over gRPC: streams become calls of the rules, results become protos.

No rules and no SQL here. The interceptors have already checked the caller (the file's
owner or an admin for GetFile, Download and DeleteFile) and validated every message of
the upload stream, so nothing is re-checked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import timestamp_pb2
from grpc import aio

from learnmesh.file.v1 import file_pb2, file_pb2_grpc
from learnmesh.kernel import principal
from learnmesh.kernel.errors import InvalidArgument
from services.file.library import Library
from services.file.sweeper import Sweeper
from services.file.uploads import Header, StoredFile, Uploads

PURPOSE_PREFIX = "PURPOSE_"


def purpose_name(value: int) -> str:
    try:
        return file_pb2.Purpose.Name(value).removeprefix(PURPOSE_PREFIX).lower()  # type: ignore[arg-type]
    except ValueError:
        return ""


def info_proto(stored: StoredFile) -> file_pb2.FileInfo:
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(stored.created_at)
    return file_pb2.FileInfo(
        id=stored.id,
        owner_id=stored.owner_id,
        filename=stored.filename,
        content_type=stored.content_type,
        size=stored.size,
        sha256=stored.sha256,
        purpose=file_pb2.Purpose.Value(PURPOSE_PREFIX + stored.purpose.upper()),
        created_at=created,
    )


async def _chunks(requests: AsyncIterator[file_pb2.UploadRequest]) -> AsyncIterator[bytes]:
    async for request in requests:
        if request.WhichOneof("payload") != "chunk":
            raise InvalidArgument.field("header", "send the header once, as the first message")
        yield request.chunk


class FileServicer(file_pb2_grpc.FileServiceServicer):
    def __init__(self, uploads: Uploads, library: Library, sweeper: Sweeper, consumes: Any) -> None:
        self.uploads = uploads
        self.library = library
        self.sweeper = sweeper
        # The service's event handlers (learnmesh.eventing.handlers.Handlers).
        self.consumes = consumes

    async def aclose(self) -> None:
        await self.sweeper.aclose()
        await self.uploads.storage.aclose()

    async def Upload(
        self,
        request_iterator: AsyncIterator[file_pb2.UploadRequest],
        context: aio.ServicerContext[Any, Any],
    ) -> file_pb2.UploadResponse:
        requests = aiter(request_iterator)
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            raise InvalidArgument.field("header", "an upload starts with its header") from None
        if first.WhichOneof("payload") != "header":
            raise InvalidArgument.field("header", "an upload starts with its header")
        h = first.header
        header = Header(
            filename=h.filename,
            content_type=h.content_type,
            size=h.size,
            sha256=h.sha256,
            purpose=purpose_name(h.purpose),
        )
        stored = await self.uploads.upload(principal.current(), header, _chunks(requests))
        return file_pb2.UploadResponse(file=info_proto(stored))

    async def GetFile(
        self, request: file_pb2.GetFileRequest, context: aio.ServicerContext[Any, Any]
    ) -> file_pb2.GetFileResponse:
        return file_pb2.GetFileResponse(file=info_proto(await self.library.get(request.file_id)))

    async def Download(
        self, request: file_pb2.DownloadRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[file_pb2.DownloadResponse]:
        stored, chunks = await self.library.download(request.file_id)
        yield file_pb2.DownloadResponse(file=info_proto(stored))
        async for chunk in chunks:
            yield file_pb2.DownloadResponse(chunk=chunk)

    async def DeleteFile(
        self, request: file_pb2.DeleteFileRequest, context: aio.ServicerContext[Any, Any]
    ) -> file_pb2.DeleteFileResponse:
        await self.library.delete(request.file_id, actor=principal.current().user_id)
        return file_pb2.DeleteFileResponse()
