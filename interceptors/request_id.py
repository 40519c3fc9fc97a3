"""Request id: ``x-request-id`` taken from the caller (or made), echoed in trailing metadata,
and recorded with the caller's address for logs and the audit trail."""

from __future__ import annotations

import random
import re
from typing import Any

from grpc import aio

from interceptors.call_state import add_trailer, call_metadata
from interceptors.client import ClientConcern, with_metadata
from interceptors.link import Behavior, ServerLink, guard
from interceptors.method import MethodInfo
from learnmesh.kernel.principal import CallInfo, call_info, set_call_info

HEADER = "x-request-id"
_ACCEPTABLE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Request ids must be unique, not secret: the Mersenne Twister (reseeded in forked
# children) is several times cheaper per call than os.urandom's system call.
_getrandbits = random.getrandbits


def peer_address(peer: str | None) -> str:
    """``ipv4:127.0.0.1:5000`` → ``127.0.0.1``; ``ipv6:[::1]:5000`` → ``::1``."""
    if not peer:
        return ""
    _, _, rest = peer.partition(":")
    if rest.startswith("["):
        return rest[1 : rest.find("]")]
    return rest.rsplit(":", 1)[0] if ":" in rest else rest


def call_info_of(context: aio.ServicerContext[Any, Any]) -> CallInfo:
    request_id = user_agent = ""
    for key, value in call_metadata(context):
        if key == HEADER and isinstance(value, str) and _ACCEPTABLE.fullmatch(value):
            request_id = value
        elif key == "user-agent":
            user_agent = str(value)[:256]
    call_id = f"{_getrandbits(128):032x}"
    return CallInfo(peer_address(context.peer()), user_agent, request_id or call_id, "", call_id)


class RequestId(ServerLink):
    needs_request = False  # the request message is not looked at

    def wrap(self, method: MethodInfo, behavior: Behavior) -> Behavior:
        def check(_request: Any, context: aio.ServicerContext[Any, Any]) -> None:
            info = call_info_of(context)
            set_call_info(info)
            add_trailer(context, HEADER, info.request_id)

        return guard(method, behavior, check)


class ClientRequestId(ClientConcern):
    """Outbound calls made while serving one carry its request id."""

    def before(self, details: aio.ClientCallDetails) -> tuple[aio.ClientCallDetails, Any]:
        request_id = call_info().request_id
        if request_id and not any(k == HEADER for k, _ in details.metadata or ()):
            details = with_metadata(details, (HEADER, request_id))
        return details, None
