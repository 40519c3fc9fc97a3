"""Request messages as the chain receives them: read inside the call, decoded without raising.

Two things grpc would otherwise do before the chain sees the call:

- **Reading the request of a unary-request method.** grpc reads it before calling the
  handler, so a client that opens a call and never sends its message holds it forever, out
  of every link's reach (no deadline runs yet). The chain registers such methods with grpc
  as request-streaming and hands the links a ``PendingRequest``; the deadline link reads it
  under the call's deadline (``ServerChain`` reads it itself, just outside the first link
  that needs it, when no deadline link does), so the default deadline covers the whole call.
- **Decoding.** A deserializer that raises makes grpc end the call with UNKNOWN and log a
  traceback, outside the chain. ``decoding`` turns undecodable bytes into an ``Undecodable``
  value instead; the validation link refuses it with INVALID_ARGUMENT, so the call has its
  request id, metric and access line like any other refused call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from grpc import aio

from learnmesh.kernel.errors import FieldViolation, InvalidArgument

Deserializer = Callable[[bytes], Any]


class Undecodable:
    """Bytes that are not a valid message of the method's request type."""

    __slots__ = ("reason", "type_name")

    def __init__(self, type_name: str, reason: str) -> None:
        self.type_name = type_name
        self.reason = reason

    def error(self) -> InvalidArgument:
        text = (
            f"the request is not a valid {self.type_name} message ({self.reason});"
            " send it serialized as the method's request type"
        )
        return InvalidArgument([FieldViolation("", text)], text)


def decoding(deserializer: Deserializer | None, type_name: str) -> Deserializer | None:
    """``deserializer`` returning an ``Undecodable`` instead of raising."""
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or a custom deserializer's error
            return Undecodable(type_name, _short(exc))

    return decode


def _short(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def refuse_undecodable(request: Any) -> None:
    """Raises INVALID_ARGUMENT when ``request`` could not be decoded."""
    if type(request) is Undecodable:
        raise request.error()


class PendingRequest:
    """The request message of a unary-request call, not read yet."""

    __slots__ = ("context",)

    def __init__(self, context: aio.ServicerContext[Any, Any]) -> None:
        self.context = context

    async def read(self) -> Any:
        message = await self.context.read()
        if message is aio.EOF:
            text = "the call ended before its request message was sent"
            raise InvalidArgument([FieldViolation("", text)], text)
        return message
