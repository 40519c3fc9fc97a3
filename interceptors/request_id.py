"""Request id: ``x-request-id`` taken from the caller (or made), echoed in trailing metadata,
and recorded with the caller's address for logs, rate limits and the audit trail.

A mesh service calling another while serving an end user forwards that user's address in
``x-learnmesh-client-address`` (``ClientRequestId``), so the next service's audit rows and
per-address limits name the user, not the calling service. The server believes the header
only from a caller whose mTLS identity starts with ``forwarders`` (the trust domain's
``service/`` SPIFFE IDs); from anyone else, and without TLS, it is ignored, so no end user
can choose the address recorded for them.
"""

from __future__ import annotations

import ipaddress
import random
import re
from typing import Any

from grpc import aio

from interceptors.call_state import add_trailer, call_metadata
from interceptors.client import ClientConcern, with_metadata
from interceptors.identity import spiffe_of
from interceptors.link import Behavior, ServerLink, guard
from interceptors.method import MethodInfo
from learnmesh.kernel.principal import CallInfo, call_info, set_call_info

HEADER = "x-request-id"
FORWARDED_ADDRESS = "x-learnmesh-client-address"
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


def forwarded_address(value: str, context: aio.ServicerContext[Any, Any], forwarders: str) -> str:
    """The address a mesh service forwarded, when the caller is one and it is an IP address;
    "" otherwise."""
    if not forwarders or not spiffe_of(context).startswith(forwarders):
        return ""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return ""


def call_info_of(context: aio.ServicerContext[Any, Any], forwarders: str = "") -> CallInfo:
    request_id = user_agent = forwarded = ""
    for key, value in call_metadata(context):
        if key == HEADER and isinstance(value, str) and _ACCEPTABLE.fullmatch(value):
            request_id = value
        elif key == "user-agent":
            user_agent = str(value)[:256]
        elif key == FORWARDED_ADDRESS and isinstance(value, str):
            forwarded = value
    address = forwarded and forwarded_address(forwarded, context, forwarders)
    call_id = f"{_getrandbits(128):032x}"
    return CallInfo(
        address or peer_address(context.peer()), user_agent, request_id or call_id, "", call_id
    )


class RequestId(ServerLink):
    needs_request = False  # the request message is not looked at

    def __init__(self, forwarders: str = "") -> None:
        # The SPIFFE ID prefix of callers whose forwarded address is believed ("": none).
        self.forwarders = forwarders

    def wrap(self, method: MethodInfo, behavior: Behavior) -> Behavior:
        forwarders = self.forwarders

        def check(_request: Any, context: aio.ServicerContext[Any, Any]) -> None:
            info = call_info_of(context, forwarders)
            set_call_info(info)
            add_trailer(context, HEADER, info.request_id)

        return guard(method, behavior, check)


class ClientRequestId(ClientConcern):
    """Outbound calls made while serving one carry its request id and its caller's address."""

    def before(self, details: aio.ClientCallDetails) -> tuple[aio.ClientCallDetails, Any]:
        info = call_info()
        sent = {k for k, _ in details.metadata or ()}
        pairs = [
            (key, value)
            for key, value in ((HEADER, info.request_id), (FORWARDED_ADDRESS, info.client_address))
            if value and key not in sent
        ]
        if pairs:
            details = with_metadata(details, *pairs)
        return details, None
