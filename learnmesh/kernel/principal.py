"""Who is making the current call, as established by the server's auth interceptors.

Handlers read ``current()``; they never parse tokens or metadata themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import NamedTuple

from learnmesh.kernel.errors import Unauthenticated


@dataclass(frozen=True)
class Principal:
    """An end user, from a verified access token."""

    user_id: str
    roles: frozenset[str] = frozenset()
    tier: str = "free"
    session_id: str = ""
    token_id: str = ""
    expires_at: float = 0.0
    # The token's ``iat``: a revocation refuses a user's tokens issued before it.
    issued_at: float = 0.0

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


class CallInfo(NamedTuple):
    """Facts about the current call that rules and the audit log need (a tuple: one is made
    for every call)."""

    client_address: str = ""
    user_agent: str = ""
    # The id echoed in ``x-request-id``: the caller's when it sent an acceptable one.
    request_id: str = ""
    # The calling mesh service's SPIFFE ID, when the call came over mTLS.
    peer_identity: str = ""
    # An id this server made for the call, whatever the caller sent (a caller's request id
    # is not trusted to be unique; the audit trail keeps both).
    call_id: str = ""


_principal: ContextVar[Principal | None] = ContextVar("learnmesh_principal", default=None)
_call: ContextVar[CallInfo] = ContextVar("learnmesh_call", default=CallInfo())  # noqa: B039


def current() -> Principal:
    """The signed-in caller; UNAUTHENTICATED if the call carries no verified token."""
    principal = _principal.get()
    if principal is None:
        raise Unauthenticated("this call needs a valid access token")
    return principal


# The context variables' own methods: several links ask on every call, and a function
# around them would add a Python call each time.
current_or_none: Callable[[], Principal | None] = _principal.get
call_info: Callable[[], CallInfo] = _call.get


def set_principal(principal: Principal | None) -> None:
    _principal.set(principal)


def set_call_info(info: CallInfo) -> None:
    _call.set(info)
