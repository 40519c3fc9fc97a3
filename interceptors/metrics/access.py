"""The access log: one JSON line per call on the ``learnmesh.access`` logger.

Formatted like ``learnmesh.kernel.logs.JsonFormatter``; written straight to the JSON writer
when it alone listens (the usual case: no LogRecord, no handler locks), else as a record
the handlers format. The caller checks that the logger is on for INFO first, so nothing of
a line is built when it is off.
"""

from __future__ import annotations

import logging
import time
from json.encoder import encode_basestring_ascii as _text
from typing import Any

from grpc import aio

from interceptors.request_id import peer_address
from learnmesh.kernel import principal
from learnmesh.kernel.logs import call_ids, direct_writer, iso_time

ACCESS_LOGGER = "learnmesh.access"
_INFO = logging.INFO


def write_access_line(
    log: logging.Logger,
    context: aio.ServicerContext[Any, Any],
    method: str,
    method_text: str,
    status: str,
    elapsed: float,
) -> None:
    """Writes the access line of the call ``context`` serves (``method_text``: ``method``
    JSON-encoded; ``status``: the final code's name; ``elapsed``: seconds)."""
    info = principal.call_info()
    duration_ms = round(elapsed * 1000, 3)
    request_id, trace_id, span_id = call_ids()
    peer = info.client_address or peer_address(context.peer())
    caller = principal.current_or_none()
    user_id = caller.user_id if caller is not None else None
    writer = direct_writer(log)
    if writer is not None:
        writer.put(
            access_line(
                time.time(),
                method_text,
                status,
                duration_ms,
                request_id,
                trace_id,
                span_id,
                peer,
                info.peer_identity,
                user_id,
            )
        )
        return
    # The ids ride on the record itself, so any handler (even one formatting on another
    # thread, away from this call's context) writes them.
    fields: dict[str, Any] = {
        "request_id": request_id,
        "trace_id": trace_id,
        "span_id": span_id,
        "peer": peer,
        "method": method,
        "status": status,
        "duration_ms": duration_ms,
    }
    if info.peer_identity:
        fields["peer_identity"] = info.peer_identity
    if user_id is not None:
        fields["user_id"] = user_id
    message = f"{method} {status} {duration_ms} ms"
    log.handle(log.makeRecord(log.name, _INFO, "", 0, message, (), None, extra=fields))


def access_line(
    created: float,
    method_text: str,
    status: str,
    duration_ms: float,
    request_id: str,
    trace_id: str,
    span_id: str,
    peer: str,
    peer_identity: str,
    user_id: str | None,
) -> str:
    """The access line ``json_line`` writes for these fields, built in one go (``method_text``
    is the method already JSON-encoded; trace and span ids are hex, status a code name)."""
    ms = repr(duration_ms)  # what json writes for a finite float, made once for two places
    ids = f', "trace_id": "{trace_id}", "span_id": "{span_id}"' if trace_id else ""
    request = f', "request_id": {_text(request_id)}' if request_id else ""
    tail = f', "peer_identity": {_text(peer_identity)}' if peer_identity else ""
    if user_id is not None:
        tail += f', "user_id": {_text(user_id)}'
    return (
        f'{{"time": "{iso_time(created)}", "level": "INFO", "logger": "{ACCESS_LOGGER}", '
        f'"message": {method_text[:-1]} {status} {ms} ms"{request}{ids}, '
        f'"peer": {_text(peer)}, "method": {method_text}, "status": "{status}", '
        f'"duration_ms": {ms}{tail}}}\n'
    )
