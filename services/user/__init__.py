"""The user service: profiles, preferences, roles, tiers (learnmesh.user.v1.UserService)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from learnmesh.service import ServiceDefinition
from learnmesh.user.v1 import user_pb2_grpc

if TYPE_CHECKING:
    from learnmesh.eventing.handlers import Handlers
    from learnmesh.service import Runtime
    from services.user.servicer import UserServicer


async def create(runtime: Runtime) -> UserServicer:
    """Builds the servicer (imported here so that importing the package stays light)."""
    from learnmesh.page_tokens import PageTokens
    from learnmesh.shared_secrets import PAGE_TOKENS, shared_secret
    from services.user import store
    from services.user.profiles import Profiles
    from services.user.servicer import UserServicer

    async with runtime.db.transaction() as session:
        key = await shared_secret(session, store.user_secrets, PAGE_TOKENS)
    return UserServicer(Profiles(runtime.db, PageTokens(key)), runtime.clients)


def _consumes(_servicer: Any) -> Handlers:
    from services.user import file_events

    return file_events.consumed()


SERVICE = ServiceDefinition(
    name="user",
    full_name="learnmesh.user.v1.UserService",
    add_to_server=user_pb2_grpc.add_UserServiceServicer_to_server,
    create=create,
    migrations=Path(__file__).parent / "migrations",
    audit_table="user_audit",
    event_tables="user",
    consumes=_consumes,
)
