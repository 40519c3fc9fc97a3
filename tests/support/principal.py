"""A test link standing in for the access link: the caller named in metadata is signed in,
so per-user and per-tier behaviour (rate limits) can be exercised without minting tokens.
Tests place it where the access link would be: ``chain_links(..., extra=MetadataPrincipal(),
before=RateLimit)``."""

from __future__ import annotations

from typing import Any

from grpc import aio

from interceptors.link import Behavior, ServerLink, guard
from interceptors.method import MethodInfo
from learnmesh.kernel import principal
from learnmesh.kernel.principal import Principal

USER_HEADER = "x-test-user"
TIER_HEADER = "x-test-tier"


class MetadataPrincipal(ServerLink):
    """Tests only: ``x-test-user`` (and ``x-test-tier``, default free) metadata sign the
    caller in; without ``x-test-user`` the caller is anonymous."""

    def wrap(self, method: MethodInfo, behavior: Behavior) -> Behavior:
        async def check(_request: Any, context: aio.ServicerContext[Any, Any]) -> None:
            found = dict(context.invocation_metadata() or ())
            user = found.get(USER_HEADER)
            principal.set_principal(
                Principal(user_id=str(user), tier=str(found.get(TIER_HEADER, "free")))
                if user
                else None
            )

        return guard(method, behavior, check)
