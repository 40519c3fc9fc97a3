"""End-user auth and access policy, enforced from each method's ``CallPolicy`` option.

The server link verifies the JWT in ``authorization: Bearer …`` locally against the auth
service's JWKS (pinned ES256, ``iss``, ``aud``, expiry, a known ``kid``), then checks the
method's policy: public, any user, owner (or admin), a role, or internal. Handlers read the
caller from ``learnmesh.kernel.principal``; none checks its caller by hand.

``internal`` methods refuse any call carrying an end-user token (the peer identity link
checks which mesh service calls them).

Refusals go to the ``on_refusal`` hook (``learnmesh.kernel.refusals``) for the audit trail:
a bad token (``auth.token_rejected``, also on a public method, where the call goes on
without it) and a verified caller or token refused by the policy
(``auth.permission_denied``). A missing token and an expired one are ordinary, not
recorded (as at IntrospectToken).

A good token whose session was revoked, or issued before its user's not-before time (a
role change, a deletion), is refused as UNAUTHENTICATED with ErrorInfo reason
``SESSION_REVOKED`` (sign in again), from the process's ``RevocationList``, which the
revocation feed keeps filled; recorded as ``auth.token_rejected``, reason
``session_revoked``, naming the user.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from grpc import aio

from interceptors.call_state import call_metadata
from interceptors.link import Behavior, ServerLink, guard
from interceptors.method import MethodInfo
from interceptors.requests import refuse_undecodable
from learnmesh.common.v1 import access_pb2
from learnmesh.kernel import principal
from learnmesh.kernel.errors import PermissionDenied, Unauthenticated
from learnmesh.kernel.principal import Principal
from learnmesh.kernel.refusals import PERMISSION_DENIED, TOKEN_REJECTED, Refusal, RefusalHook
from learnmesh.kernel.revocations import RevocationList
from learnmesh.kernel.tokens import TokenRejected, TokenVerifier

log = logging.getLogger("learnmesh.auth")

# (method, request, caller) -> the owner's user id, for resources that are not users.
OwnerResolver = Callable[[Any], Awaitable[str | None]]

SESSION_REVOKED = "SESSION_REVOKED"


def revoked_token() -> Unauthenticated:
    return Unauthenticated(
        "the session of this access token has ended (signed out, revoked, or the account "
        "changed): sign in again",
        reason=SESSION_REVOKED,
    )


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer …`` header, if any."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise TokenRejected(
                    "authorization metadata must be 'Bearer <access token>'", "malformed_header"
                )
            return token.strip()
    return None


class AccessPolicy(ServerLink):
    """Enforces the method's ``learnmesh.common.v1.policy`` option."""

    def __init__(
        self,
        verifier: TokenVerifier,
        owner_resolvers: Mapping[str, OwnerResolver] | None = None,
        *,
        on_refusal: RefusalHook | None = None,
        revocations: RevocationList | None = None,
    ) -> None:
        self.verifier = verifier
        self.revocations = revocations if revocations is not None else RevocationList()
        # Kept by reference: the runtime fills it once the servicers exist.
        self.owner_resolvers = owner_resolvers if owner_resolvers is not None else {}
        self.on_refusal = on_refusal

    def start(self) -> None:
        """Fetches the signing keys now and keeps them fresh (the server starts it)."""
        self.verifier.keys.start()

    async def aclose(self) -> None:
        await self.verifier.keys.aclose()

    def wrap(self, method: MethodInfo, behavior: Behavior) -> Behavior:
        policy = method.policy
        access = policy.access
        resolver = self.owner_resolvers.get(method.full_method)
        verifier = self.verifier
        hook = self.on_refusal
        full_method = method.full_method
        needs_role = "role:" + ",".join(policy.roles)
        revoked = self.revocations.refuses

        def refused(event: str, reason: str, subject: str = "", required: str = "") -> None:
            if hook is not None:
                hook(Refusal(event, full_method, reason, principal.call_info(), subject, required))

        def rejected(exc: TokenRejected) -> None:
            if exc.why != "expired":  # an expired token is ordinary: its holder refreshes
                refused(TOKEN_REJECTED, exc.why)

        def refused_revoked(caller: Principal) -> None:
            refused(TOKEN_REJECTED, "session_revoked", caller.user_id)

        async def check(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
            try:
                token = bearer_token(call_metadata(context))
            except TokenRejected as exc:
                rejected(exc)
                raise
            if access == access_pb2.ACCESS_INTERNAL:
                if token is not None:
                    refused(PERMISSION_DENIED, "end_user_token", required="internal")
                    raise PermissionDenied(f"{method.name} is for mesh services, not end users")
                return
            if access == access_pb2.ACCESS_PUBLIC:
                if token is not None:
                    # A signed-in caller of a public method is still known, when the token is good.
                    try:
                        known: Principal | None = await verifier.verify(token)
                    except TokenRejected as exc:
                        rejected(exc)
                        known = None
                    if known is not None and revoked(known):
                        refused_revoked(known)
                        known = None
                    principal.set_principal(known)
                return
            if access == access_pb2.ACCESS_UNSPECIFIED:
                refused(PERMISSION_DENIED, "no_policy")
                raise PermissionDenied(f"{method.name} declares no access policy")
            if token is None:
                raise Unauthenticated(f"{method.name} needs an access token")
            try:
                caller = await verifier.verify(token)
            except TokenRejected as exc:  # not a coroutine around verify: this is every call
                rejected(exc)
                raise
            if revoked(caller):
                refused_revoked(caller)
                raise revoked_token()
            principal.set_principal(caller)
            if access == access_pb2.ACCESS_ROLE:
                if not caller.roles.intersection(policy.roles):
                    refused(PERMISSION_DENIED, "role", caller.user_id, needs_role)
                    raise PermissionDenied(
                        f"{method.name} needs the role {' or '.join(policy.roles)}"
                    )
            elif access == access_pb2.ACCESS_OWNER and not caller.is_admin:
                owner = await self._owner(method, resolver, request)
                if owner != caller.user_id:
                    refused(PERMISSION_DENIED, "not_owner", caller.user_id, "owner")
                    raise PermissionDenied(
                        f"{method.name} is allowed only to the owner or an admin"
                    )

        return guard(method, behavior, check)

    @staticmethod
    async def _owner(
        method: MethodInfo, resolver: OwnerResolver | None, request: Any
    ) -> str | None:
        refuse_undecodable(request)  # before a resolver reads its fields
        if resolver is not None:
            return await resolver(request)
        field = method.policy.owner_field
        if request is None or not field:
            return None
        return str(getattr(request, field, "") or "") or None
