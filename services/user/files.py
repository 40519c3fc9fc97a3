"""The file service as the user service sees it: one lookup, on the caller's behalf.

The caller's own ``authorization`` travels with the call, so the file service itself checks
that the file is theirs; its answers become the user service's domain errors.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from grpc import aio

from learnmesh.client import ClientFactory
from learnmesh.file.v1 import file_pb2
from learnmesh.kernel.errors import NotFound, Unauthenticated, Unavailable
from services.user.profiles import AvatarFile, FileLookup

TIMEOUT = 5.0
# Metadata of the inbound call that the file service must see as its own (the client
# chain already propagates the request id and the deadline).
FORWARDED = ("authorization",)
_UNREACHABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
_NOT_YOURS = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED}


def _purpose_name(value: file_pb2.Purpose.ValueType) -> str:
    """PURPOSE_AVATAR → "avatar"; a number this build does not know → ""."""
    try:
        return file_pb2.Purpose.Name(value).removeprefix("PURPOSE_").lower()
    except ValueError:
        return ""


def forwarded(metadata: Iterable[tuple[str, Any]] | None) -> tuple[tuple[str, str], ...]:
    return tuple((k, str(v)) for k, v in metadata or () if k in FORWARDED)


def lookup_for(clients: ClientFactory, metadata: Iterable[tuple[str, Any]] | None) -> FileLookup:
    """A FileLookup that asks the file service with the inbound call's credentials."""
    outbound = forwarded(metadata)

    async def lookup(file_id: str) -> AvatarFile:
        try:
            response = await clients.stub("file").GetFile(
                file_pb2.GetFileRequest(file_id=file_id), metadata=outbound, timeout=TIMEOUT
            )
        except aio.AioRpcError as exc:
            if exc.code() in _UNREACHABLE:
                raise Unavailable("the file service is not reachable") from None
            if exc.code() in _NOT_YOURS:
                raise NotFound(f"no file {file_id} of yours") from None
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated("the file service did not accept the access token") from None
            raise
        info = response.file
        return AvatarFile(
            id=info.id,
            owner_id=info.owner_id,
            purpose=_purpose_name(info.purpose),
            content_type=info.content_type,
        )

    return lookup
