"""UserService over gRPC: requests become calls of ``profiles.Profiles``, results become protos.

No rules and no SQL here. The interceptors have already verified the caller against the
method's policy and validated the request, so nothing is re-checked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar, cast

from google.protobuf import timestamp_pb2
from grpc import aio

from learnmesh.client import ClientFactory
from learnmesh.common.v1 import common_pb2
from learnmesh.kernel import principal
from learnmesh.user.v1 import user_pb2, user_pb2_grpc
from services.user import files
from services.user.profiles import Preferences, Profile, ProfileChanges, Profiles

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

_Value = TypeVar("_Value", bound=int)

ROLE_PREFIX = "ROLE_"
TIER_PREFIX = "SUBSCRIPTION_TIER_"
THEME_PREFIX = "THEME_"
CHANNEL_PREFIX = "NOTIFICATION_CHANNEL_"


def name_of(enum: Any, value: int, prefix: str) -> str:
    """ROLE_FREE_USER → "free_user"; the zero value or an unknown number → ""."""
    if value == 0:
        return ""
    try:
        full: str = enum.Name(value)
    except ValueError:
        return ""
    return full.removeprefix(prefix).lower()


def value_of(enum: _EnumTypeWrapper[_Value], name: str, prefix: str) -> _Value:
    """Name to number: "free_user" → ROLE_FREE_USER; unknown or empty → 0 (unspecified)."""
    try:
        number = enum.Value(prefix + name.upper())
    except ValueError:
        return cast("_Value", 0)  # every proto3 enum's zero value
    return number


def timestamp(moment: Any) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def preferences_proto(preferences: Preferences) -> user_pb2.Preferences:
    return user_pb2.Preferences(
        theme=value_of(user_pb2.Theme, preferences.theme, THEME_PREFIX),
        language=preferences.language,
        notification_channels=[
            value_of(common_pb2.NotificationChannel, c, CHANNEL_PREFIX)
            for c in preferences.notification_channels
        ],
    )


def preferences_of(message: user_pb2.Preferences) -> Preferences:
    return Preferences(
        theme=name_of(user_pb2.Theme, message.theme, THEME_PREFIX),
        language=message.language,
        notification_channels=tuple(
            name_of(common_pb2.NotificationChannel, c, CHANNEL_PREFIX)
            for c in message.notification_channels
        ),
    )


def user_proto(profile: Profile) -> user_pb2.User:
    return user_pb2.User(
        id=profile.id,
        email=profile.email,
        display_name=profile.display_name,
        avatar_url=profile.avatar_url,
        bio=profile.bio,
        role=value_of(user_pb2.Role, profile.role, ROLE_PREFIX),
        tier=value_of(user_pb2.SubscriptionTier, profile.tier, TIER_PREFIX),
        preferences=preferences_proto(profile.preferences),
        created_at=timestamp(profile.created_at),
        updated_at=timestamp(profile.updated_at),
    )


class UserServicer(user_pb2_grpc.UserServiceServicer):
    def __init__(self, profiles: Profiles, clients: ClientFactory) -> None:
        self.profiles = profiles
        self.clients = clients

    async def GetMe(
        self, request: user_pb2.GetMeRequest, context: aio.ServicerContext[Any, Any]
    ) -> user_pb2.GetMeResponse:
        profile = await self.profiles.get(principal.current().user_id)
        return user_pb2.GetMeResponse(user=user_proto(profile))

    async def UpdateMe(
        self, request: user_pb2.UpdateMeRequest, context: aio.ServicerContext[Any, Any]
    ) -> user_pb2.UpdateMeResponse:
        changes = ProfileChanges(
            display_name=request.profile.display_name,
            bio=request.profile.bio,
            preferences=preferences_of(request.profile.preferences),
        )
        profile = await self.profiles.update(
            principal.current().user_id, changes, request.update_mask.paths
        )
        return user_pb2.UpdateMeResponse(user=user_proto(profile))

    async def GetUser(
        self, request: user_pb2.GetUserRequest, context: aio.ServicerContext[Any, Any]
    ) -> user_pb2.GetUserResponse:
        profile = await self.profiles.get(request.user_id)
        return user_pb2.GetUserResponse(user=user_proto(profile))

    async def ListUsers(
        self, request: user_pb2.ListUsersRequest, context: aio.ServicerContext[Any, Any]
    ) -> user_pb2.ListUsersResponse:
        page = await self.profiles.page(
            page_size=request.page_size if request.HasField("page_size") else None,
            page_token=request.page_token,
            role=name_of(user_pb2.Role, request.role, ROLE_PREFIX),
            text=request.query,
        )
        return user_pb2.ListUsersResponse(
            users=[user_proto(p) for p in page.profiles], next_page_token=page.next_page_token
        )

    async def SetRole(
        self, request: user_pb2.SetRoleRequest, context: aio.ServicerContext[Any, Any]
    ) -> user_pb2.SetRoleResponse:
        profile = await self.profiles.set_role(
            request.user_id,
            name_of(user_pb2.Role, request.role, ROLE_PREFIX),
            actor=principal.current().user_id,
        )
        return user_pb2.SetRoleResponse(user=user_proto(profile))

    async def SetTier(
        self, request: user_pb2.SetTierRequest, context: aio.ServicerContext[Any, Any]
    ) -> user_pb2.SetTierResponse:
        profile = await self.profiles.set_tier(
            request.user_id,
            name_of(user_pb2.SubscriptionTier, request.tier, TIER_PREFIX),
            actor=principal.current().user_id,
        )
        return user_pb2.SetTierResponse(user=user_proto(profile))

    async def DeleteUser(
        self, request: user_pb2.DeleteUserRequest, context: aio.ServicerContext[Any, Any]
    ) -> user_pb2.DeleteUserResponse:
        await self.profiles.delete(request.user_id, actor=principal.current().user_id)
        return user_pb2.DeleteUserResponse()

    async def SetAvatar(
        self, request: user_pb2.SetAvatarRequest, context: aio.ServicerContext[Any, Any]
    ) -> user_pb2.SetAvatarResponse:
        lookup = files.lookup_for(self.clients, context.invocation_metadata())
        profile = await self.profiles.set_avatar(
            principal.current().user_id, request.file_id, lookup
        )
        return user_pb2.SetAvatarResponse(user=user_proto(profile))

    async def CreateUser(
        self, request: user_pb2.CreateUserRequest, context: aio.ServicerContext[Any, Any]
    ) -> user_pb2.CreateUserResponse:
        profile = await self.profiles.create(request.user_id, request.email, request.display_name)
        return user_pb2.CreateUserResponse(user=user_proto(profile))

    async def BatchGetUsers(
        self, request: user_pb2.BatchGetUsersRequest, context: aio.ServicerContext[Any, Any]
    ) -> user_pb2.BatchGetUsersResponse:
        profiles = await self.profiles.batch_get(request.user_ids)
        return user_pb2.BatchGetUsersResponse(users=[user_proto(p) for p in profiles])
