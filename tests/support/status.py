"""The google.rpc.Status of a failed call and its details, read with grpcio-status.

``rpc_status.from_call`` also checks that the status in the details agrees with the call's
own code and message, so every test reading details checks that too.
"""

from __future__ import annotations

from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status

DetailT = TypeVar("DetailT", bound=Message)


def status_of(err: aio.AioRpcError) -> status_pb2.Status:
    """The rich status the server sent with ``err`` (failing the test when there is none)."""
    status: status_pb2.Status | None = rpc_status.from_call(err)  # type: ignore[arg-type]  # reads only what an AioRpcError has
    assert status is not None, f"no status details in the trailers of {err.code()}"
    return status


def details_of(err: aio.AioRpcError, kind: type[DetailT]) -> list[DetailT]:
    """Every detail of type ``kind`` in ``err``'s status, in order."""
    found = []
    for packed in status_of(err).details:
        message = kind()
        if packed.Unpack(message):  # False when the detail is of another type
            found.append(message)
    return found


def detail_of(err: aio.AioRpcError, kind: type[DetailT]) -> DetailT:
    """The one detail of type ``kind`` in ``err``'s status."""
    found = details_of(err, kind)
    assert len(found) == 1, f"{len(found)} {kind.__name__} details in {err!r}"
    return found[0]


def error_reason(err: aio.AioRpcError) -> str:
    """The ErrorInfo reason, or "" when the status carries no ErrorInfo."""
    found = details_of(err, error_details_pb2.ErrorInfo)
    return found[0].reason if found else ""


def all_violations(err: aio.AioRpcError) -> list[tuple[str, str]]:
    """(field, description) of every BadRequest field violation, in order."""
    return [
        (v.field, v.description)
        for bad in details_of(err, error_details_pb2.BadRequest)
        for v in bad.field_violations
    ]


def violations(err: aio.AioRpcError) -> dict[str, str]:
    """field -> description of the BadRequest field violations (the last one per field)."""
    return dict(all_violations(err))


def retry_delay(err: aio.AioRpcError) -> float:
    """The RetryInfo delay, in seconds."""
    delay = detail_of(err, error_details_pb2.RetryInfo).retry_delay
    return delay.seconds + delay.nanos / 1e9


async def refused(call: Any, code: grpc.StatusCode) -> aio.AioRpcError:
    """Awaits ``call`` and returns its error, failing unless it ended with ``code``."""
    with pytest.raises(aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, (caught.value.code(), caught.value.details())
    return caught.value
