"""What the links share about the current call: the trailing metadata they add and the
call's invocation metadata, each kept in a context variable of the call's task."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import grpc
from grpc import aio

_trailers: ContextVar[list[tuple[str, str | bytes]] | None] = ContextVar(
    "learnmesh_trailers", default=None
)


def add_trailer(context: aio.ServicerContext[Any, Any], key: str, value: str | bytes) -> None:
    """Adds trailing metadata to the call without dropping what other links added."""
    found = _trailers.get()
    if found is None:
        found = []
        _trailers.set(found)
    found.append((key, value))
    context.set_trailing_metadata(tuple(found))


def add_trailers(context: aio.ServicerContext[Any, Any], *pairs: tuple[str, str | bytes]) -> None:
    """Adds several trailing metadata entries at once (one update of the call's trailers)."""
    found = _trailers.get()
    if found is None:
        found = []
        _trailers.set(found)
    found.extend(pairs)
    context.set_trailing_metadata(tuple(found))


# (owner, the call's invocation metadata). The owner is None when grpc's handler lookup
# handed the metadata over (it runs in the call's own task, just before the handler), else
# the context it was read from, so a value left in a task that serves several calls (tests,
# the benchmark) is never taken for another call's.
_metadata: ContextVar[tuple[Any, Any] | None] = ContextVar("learnmesh_call_metadata", default=None)


def call_metadata(context: aio.ServicerContext[Any, Any]) -> Any:
    """The call's invocation metadata, read once per call (asking the context builds a fresh
    tuple every time, which several links would otherwise each pay for)."""
    found = _metadata.get()
    if found is not None and (found[0] is None or found[0] is context):
        return found[1]
    metadata = context.invocation_metadata() or ()
    _metadata.set((context, metadata))
    return metadata


def keep_metadata(handler_call_details: grpc.HandlerCallDetails) -> None:
    """Keeps the metadata grpc's handler lookup was given, for ``call_metadata``."""
    _metadata.set((None, handler_call_details.invocation_metadata or ()))


def trailers() -> tuple[tuple[str, str | bytes], ...]:
    """The trailing metadata links added to the current call (errors re-send it on abort)."""
    return tuple(_trailers.get() or ())
