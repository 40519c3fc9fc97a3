"""Refused calls, as the links that refuse them describe them for the audit trail.

The peer identity and end-user auth links cannot write audit rows themselves (links import
no database); each takes a ``RefusalHook`` and hands it one ``Refusal`` per refused call.
The assembly wires the hook to a writer that stores them off the call path, so the hook
must return at once and never raise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from learnmesh.kernel.principal import CallInfo

TOKEN_REJECTED = "auth.token_rejected"
PERMISSION_DENIED = "auth.permission_denied"
PEER_DENIED = "peer.denied"


@dataclass(frozen=True)
class Refusal:
    """One refused call (or, on a public method, one refused token the call went on
    without). Every text is the server's own (a fixed reason, a method name, a verified
    user id or the certificate's identity), never a token or other caller-chosen text."""

    event: str  # TOKEN_REJECTED, PERMISSION_DENIED or PEER_DENIED
    method: str  # "/learnmesh.user.v1.UserService/SetRole"
    reason: str  # a fixed word: "bad_signature", "unknown_kid", "role", "not_allowed", …
    # The call's address, request id, call id and peer identity when it was refused.
    call: CallInfo
    # The verified user refused (permission denials only; a rejected token names no one).
    subject: str = ""
    # What the method needs: "role:admin", "owner", "internal", "callers:auth,user".
    required: str = ""


RefusalHook = Callable[[Refusal], None]
