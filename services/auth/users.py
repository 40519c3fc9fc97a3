"""The user service as the auth service sees it: create a profile, look one up.

The only module that knows the UserService stub. Its statuses become kernel errors here,
so the rules never handle gRPC errors themselves.
"""

from __future__ import annotations

import logging

import grpc
from grpc import aio

from learnmesh.client import ClientFactory
from learnmesh.kernel.errors import AlreadyExists, Unavailable
from learnmesh.user.v1 import user_pb2

log = logging.getLogger("learnmesh.auth")

TIMEOUT = 5.0
ACCOUNT_EXISTS = "an account with this email already exists"
# Codes after which the user service may or may not have created the profile.
_MAYBE_CREATED = {
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}


class ProfileNotCreated(Unavailable):
    """CreateUser failed; ``maybe_created`` when the profile may exist all the same (the
    registration must then be kept, so a retry with the same user id finishes it)."""

    def __init__(self, *, maybe_created: bool) -> None:
        super().__init__("the account cannot be created right now; try again")
        self.maybe_created = maybe_created


def roles_of(user: user_pb2.User) -> list[str]:
    """``ROLE_FREE_USER`` → ``["free_user"]``; no role → no roles."""
    if user.role == user_pb2.ROLE_UNSPECIFIED:
        return []
    return [user_pb2.Role.Name(user.role).removeprefix("ROLE_").lower()]


def tier_of(user: user_pb2.User) -> str:
    if user.tier == user_pb2.SUBSCRIPTION_TIER_UNSPECIFIED:
        return "free"
    return user_pb2.SubscriptionTier.Name(user.tier).removeprefix("SUBSCRIPTION_TIER_").lower()


class UserDirectory:
    """Profiles in the user service, reached through the runtime's client factory."""

    def __init__(self, clients: ClientFactory) -> None:
        self._clients = clients

    async def create(self, user_id: str, email: str, display_name: str) -> user_pb2.User:
        """The new profile; AlreadyExists when the email is taken there, ProfileNotCreated
        otherwise. CreateUser is idempotent by user id."""
        try:
            created = await self._clients.stub("user").CreateUser(
                user_pb2.CreateUserRequest(user_id=user_id, email=email, display_name=display_name),
                timeout=TIMEOUT,
            )
        except aio.AioRpcError as exc:
            code = exc.code()
            log.warning("CreateUser failed for a registration: %s", code.name)
            if code == grpc.StatusCode.ALREADY_EXISTS:
                raise AlreadyExists(ACCOUNT_EXISTS) from None
            raise ProfileNotCreated(maybe_created=code in _MAYBE_CREATED) from None
        user: user_pb2.User = created.user
        return user

    async def get(self, user_id: str) -> user_pb2.User | None:
        """The user's profile, or None when it no longer exists."""
        try:
            response = await self._clients.stub("user").BatchGetUsers(
                user_pb2.BatchGetUsersRequest(user_ids=[user_id]), timeout=TIMEOUT
            )
        except aio.AioRpcError as exc:
            log.warning("BatchGetUsers failed: %s", exc.code().name)
            raise Unavailable("the user service is unavailable; try again") from None
        for user in response.users:
            if user.id == user_id:
                found: user_pb2.User = user
                return found
        return None
