"""End-user auth and access policy, enforced from each method's ``CallPolicy`` option.

The server link verifies the JWT in ``authorization: Bearer …`` locally against the auth
service's JWKS (pinned ES256, ``iss``, ``aud``, expiry, a known ``kid``), then checks the
method's policy: public, any user, owner (or admin), a role, or internal. Handlers read the
caller from ``learnmesh.kernel.principal``; none checks its caller by hand.

Until mTLS identities arrive, ``internal`` methods refuse any call carrying an end-user
token (the mesh listens on loopback unless configured otherwise).
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
from learnmesh.kernel.tokens import TokenVerifier

log = logging.getLogger("learnmesh.auth")

# (method, request, caller) -> the owner's user id, for resources that are not users.
OwnerResolver = Callable[[Any], Awaitable[str | None]]


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer …`` header, if any."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization metadata must be 'Bearer <access token>'")
            return token.strip()
    return None


class AccessPolicy(ServerLink):
    """Enforces the method's ``learnmesh.common.v1.policy`` option."""

    def __init__(
        self,
        verifier: TokenVerifier,
        owner_resolvers: Mapping[str, OwnerResolver] | None = None,
    ) -> None:
        self.verifier = verifier
        # Kept by reference: the runtime fills it once the servicers exist.
        self.owner_resolvers = owner_resolvers if owner_resolvers is not None else {}

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

        async def check(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
            token = bearer_token(call_metadata(context))
            if access == access_pb2.ACCESS_INTERNAL:
                if token is not None:
                    raise PermissionDenied(f"{method.name} is for mesh services, not end users")
                return
            if access == access_pb2.ACCESS_PUBLIC:
                if token is not None:
                    # A signed-in caller of a public method is still known, when the token is good.
                    try:
                        principal.set_principal(await verifier.verify(token))
                    except Unauthenticated:
                        principal.set_principal(None)
                return
            if access == access_pb2.ACCESS_UNSPECIFIED:
                raise PermissionDenied(f"{method.name} declares no access policy")
            if token is None:
                raise Unauthenticated(f"{method.name} needs an access token")
            caller = await verifier.verify(token)
            principal.set_principal(caller)
            if access == access_pb2.ACCESS_ROLE:
                if not caller.roles.intersection(policy.roles):
                    raise PermissionDenied(
                        f"{method.name} needs the role {' or '.join(policy.roles)}"
                    )
            elif access == access_pb2.ACCESS_OWNER and not caller.is_admin:
                owner = await self._owner(method, resolver, request)
                if owner != caller.user_id:
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
