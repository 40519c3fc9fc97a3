"""What the auth service does when the user service deletes a user (``user.deleted``): the
account's credentials, sessions, refresh tokens, MFA secret, recovery codes and reset
tokens go, so the email can register again; the audit trail stays.

It runs in the consumer's transaction, which also records the event as processed: a
redelivered ``user.deleted`` changes nothing the second time.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from learnmesh import audit
from learnmesh.eventing.handlers import Handlers
from learnmesh.events.v1 import events_pb2
from services.auth import store
from services.auth.sessions import emit_revoked, tokens_expire_at

# The auth service's consumer group, shared by its replicas.
GROUP = "auth"
REASON = "user_deleted"


async def forget_user(session: AsyncSession, user_id: str, *, access_ttl: int) -> int:
    """Deletes what auth keeps of ``user_id`` and emits ``session.revoked`` for all their
    sessions (tokens of ``access_ttl`` seconds); returns how many sessions went."""
    issued = await store.forget_user(session, user_id)
    await audit.record(session, store.audit, "account.forgotten", user_id, sessions=len(issued))
    await emit_revoked(session, user_id, REASON, tokens_expire_at(issued, access_ttl))
    return len(issued)


def consumed(access_ttl: int) -> Handlers:
    """The events the auth service consumes."""
    handlers = Handlers(GROUP)

    @handlers.on("user.deleted", events_pb2.UserDeleted)
    async def on_user_deleted(
        session: AsyncSession, event: events_pb2.Event, data: events_pb2.UserDeleted
    ) -> None:
        await forget_user(session, data.user_id, access_ttl=access_ttl)

    return handlers
