"""Peer identity (mTLS): the caller's SPIFFE ID from its client certificate.

With TLS on, the server has already demanded a certificate from the mesh's CA in the
handshake; this link reads the caller's SPIFFE ID (grpc reports ``peer_spiffe_id`` only for
a certificate with exactly one URI SAN), records it for logs, and lets ``internal`` methods
through only for the service identities their proto option (plus configuration) allows.
Without TLS (``--insecure``) there is no identity to check: internal methods then rely on
the end-user-token rule of the auth link alone.

Each refused internal call goes to the ``on_refusal`` hook as ``peer.denied``
(``learnmesh.kernel.refusals``), with the identity in the call info.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from grpc import aio

from interceptors.link import Behavior, ServerLink, guard
from interceptors.method import MethodInfo
from learnmesh.common.v1 import access_pb2
from learnmesh.kernel import principal
from learnmesh.kernel.errors import PermissionDenied, Unauthenticated
from learnmesh.kernel.refusals import PEER_DENIED, Refusal, RefusalHook


def spiffe_of(context: aio.ServicerContext[Any, Any]) -> str:
    """The caller's SPIFFE ID, or "" when the channel has none."""
    values = tuple(context.auth_context().get("peer_spiffe_id") or ())
    return values[0].decode() if len(values) == 1 else ""


def mesh_service_prefix(trust_domain: str) -> str:
    """What the SPIFFE ID of every mesh service of ``trust_domain`` starts with."""
    return f"spiffe://{trust_domain}/service/"


class PeerIdentity(ServerLink):
    needs_request = False  # the request message is not looked at

    def __init__(
        self,
        trust_domain: str,
        *,
        tls: bool,
        extra_callers: Mapping[str, frozenset[str]] | None = None,
        on_refusal: RefusalHook | None = None,
    ) -> None:
        self.prefix = mesh_service_prefix(trust_domain)
        self.tls = tls
        self.extra = dict(extra_callers or {})
        self.on_refusal = on_refusal

    def wrap(self, method: MethodInfo, behavior: Behavior) -> Behavior:
        if not self.tls:
            return behavior
        internal = method.policy.access == access_pb2.ACCESS_INTERNAL
        allowed = frozenset(method.policy.callers) | self.extra.get(method.full_method, frozenset())
        prefix = self.prefix
        name = method.name
        full_method = method.full_method
        hook = self.on_refusal
        required = "callers:" + ",".join(sorted(allowed))

        def refused(reason: str) -> None:
            if hook is not None:
                hook(Refusal(PEER_DENIED, full_method, reason, principal.call_info(), "", required))

        def check(_request: Any, context: aio.ServicerContext[Any, Any]) -> None:
            identity = spiffe_of(context)
            if identity:
                info = principal.call_info()
                principal.set_call_info(info._replace(peer_identity=identity))
            if not internal:
                return
            if not identity:
                refused("no_identity")
                raise Unauthenticated(f"{name} needs a mesh certificate with one SPIFFE ID")
            service = identity[len(prefix) :] if identity.startswith(prefix) else ""
            if service not in allowed:
                refused("not_allowed")
                raise PermissionDenied(
                    f"{name} is internal and {identity} is not among its allowed callers"
                )

        return guard(method, behavior, check)
