"""Sessions: starting one at sign-in, refresh-token rotation, logout, listing and revoking.

A session is one family of refresh tokens (RFC 9700 §4.14.2): each refresh spends the
token for a new one, and a spent token presented again ends the whole family.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NoReturn

from sqlalchemy.ext.asyncio import AsyncSession

from learnmesh import audit
from learnmesh.db import utcnow
from learnmesh.eventing.outbox import emit
from learnmesh.events.v1 import events_pb2
from learnmesh.kernel import principal
from learnmesh.kernel.errors import NotFound, Unauthenticated
from learnmesh.kernel.tokens import LEEWAY
from learnmesh.user.v1 import user_pb2
from services.auth import store
from services.auth.deps import Deps, actor_for
from services.auth.tokens import digest, new_refresh_token
from services.auth.users import roles_of, tier_of

BAD_REFRESH_TOKEN = "the refresh token is not valid; sign in again"
# An access token's exp is whole seconds after its session's last_used_at was written.
ISSUE_MARGIN = timedelta(seconds=1)


@dataclass(frozen=True)
class SignedIn:
    user: user_pb2.User
    access_token: str
    refresh_token: str
    expires_in: int
    session_id: str


@dataclass(frozen=True)
class SessionInfo:
    id: str
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    client_address: str
    user_agent: str
    current: bool


def tokens_expire_at(last_issued: Iterable[datetime], access_ttl: int) -> datetime:
    """When the last access token issued at ``last_issued`` (sessions' last_used_at) stops
    being accepted anyway: its exp plus the verifiers' leeway (now, when none was issued)."""
    latest = max(last_issued, default=utcnow() - timedelta(seconds=access_ttl))
    return latest + timedelta(seconds=access_ttl + LEEWAY) + ISSUE_MARGIN


async def emit_revoked(
    session: AsyncSession,
    user_id: str,
    reason: str,
    expires_at: datetime,
    session_ids: Sequence[str] = (),
) -> None:
    """``session.revoked`` for ``session_ids``, or for all the user's sessions when none
    is named, in ``session``'s transaction."""
    revoked = events_pb2.SessionRevoked(
        user_id=user_id,
        session_ids=list(session_ids),
        all_sessions=not session_ids,
        reason=reason,
    )
    revoked.expires_at.FromDatetime(expires_at)
    await emit(session, store.events.outbox, "session.revoked", user_id, revoked)


async def revoke(
    session: AsyncSession,
    user_id: str,
    reason: str,
    session_ids: Sequence[str] | None = None,
    *,
    access_ttl: int,
    actor: str | None = None,
) -> list[str]:
    """Revokes the user's live sessions (or those of ``session_ids``), auditing each one
    (``actor``: who did it, when not the signed-in caller) and emitting ``session.revoked``
    for them, valid until their last access token (``access_ttl`` seconds) expires."""
    revoked = await store.revoke_sessions(session, user_id, reason, session_ids=session_ids)
    for session_id in revoked:
        await audit.record(
            session,
            store.audit,
            "session.revoked",
            user_id,
            actor=actor_for(user_id) if actor is None else actor,
            session_id=session_id,
            reason=reason,
        )
    if revoked:
        expires_at = tokens_expire_at(revoked.values(), access_ttl)
        named = list(revoked) if session_ids is not None else []
        await emit_revoked(session, user_id, reason, expires_at, named)
    return list(revoked)


class Sessions:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    @property
    def ttl(self) -> int:
        """Seconds an access token lives."""
        return self.deps.settings.access_token_ttl

    async def start(self, session: AsyncSession, user_id: str, user: user_pb2.User) -> SignedIn:
        """A new session (refresh-token family) with its first token pair, in ``session``."""
        call = principal.call_info()
        row = await store.add_session(
            session,
            user_id,
            ttl_seconds=self.deps.settings.refresh_token_ttl,
            client_address=call.client_address,
            user_agent=call.user_agent,
        )
        refresh_token, token_hash = new_refresh_token()
        await store.add_refresh_token(session, row.id, token_hash, row.expires_at)
        access = await self.deps.tokens.issue(user_id, roles_of(user), tier_of(user), row.id)
        return SignedIn(user, access.token, refresh_token, access.expires_in, row.id)

    async def refresh(self, refresh_token: str) -> SignedIn:
        """Spends the refresh token for a new pair in the same session."""
        deps = self.deps
        async with deps.transaction() as session:
            found = await store.refresh_token_by_hash(session, digest(refresh_token))
        if found is None:
            # Never issued here (or long purged): guessed, forged or corrupted.
            await deps.audit_now("refresh_token.rejected", "", reason="unknown")
            raise Unauthenticated(BAD_REFRESH_TOKEN, reason="INVALID_REFRESH_TOKEN")
        owner = found.session
        if found.spent_at is not None:
            await self._reuse_detected(owner)
        if owner.revoked_at is not None:
            await deps.audit_now(
                "refresh_token.rejected", owner.user_id, reason="session_ended", session_id=owner.id
            )
            raise Unauthenticated("the session has ended; sign in again", reason="SESSION_ENDED")
        now = utcnow()
        if found.expires_at <= now or owner.expires_at <= now:
            await deps.audit_now(
                "refresh_token.rejected", owner.user_id, reason="expired", session_id=owner.id
            )
            raise Unauthenticated(
                "the refresh token has expired; sign in again", reason="REFRESH_TOKEN_EXPIRED"
            )
        user = await deps.users.get(owner.user_id)
        if user is None:
            async with deps.transaction() as session:
                await revoke(
                    session,
                    owner.user_id,
                    "account_deleted",
                    [owner.id],
                    access_ttl=deps.settings.access_token_ttl,
                )
            raise Unauthenticated("this account no longer exists", reason="ACCOUNT_DELETED")
        signed_in: SignedIn | None = None
        async with deps.transaction() as session:
            if await store.spend_refresh_token(session, found.token_id):
                current = await store.session_by_id(session, owner.id)
                if current is not None and current.revoked_at is None:
                    new_token, token_hash = new_refresh_token()
                    await store.add_refresh_token(session, owner.id, token_hash, owner.expires_at)
                    await store.touch_session(session, owner.id)
                    access = await deps.tokens.issue(
                        owner.user_id, roles_of(user), tier_of(user), owner.id
                    )
                    signed_in = SignedIn(user, access.token, new_token, access.expires_in, owner.id)
        if signed_in is None:
            # Another call spent the token between our read and our update: that is reuse.
            await self._reuse_detected(owner)
        return signed_in

    async def _reuse_detected(self, owner: store.Session) -> NoReturn:
        async with self.deps.transaction() as session:
            await audit.record(
                session, store.audit, "refresh_token.reused", owner.user_id, session_id=owner.id
            )
            await revoke(
                session, owner.user_id, "refresh_token_reuse", [owner.id], access_ttl=self.ttl
            )
        raise Unauthenticated(
            "this refresh token was already used; its session has been ended, sign in again",
            reason="REFRESH_TOKEN_REUSED",
        )

    async def logout(self, refresh_token: str, all_sessions: bool) -> int:
        caller = principal.current()
        async with self.deps.transaction() as session:
            if all_sessions:
                revoked = await revoke(session, caller.user_id, "logout_all", access_ttl=self.ttl)
            elif refresh_token:
                found = await store.refresh_token_by_hash(session, digest(refresh_token))
                if found is None or found.session.user_id != caller.user_id:
                    raise NotFound("no session of yours has this refresh token")
                revoked = await revoke(
                    session, caller.user_id, "logout", [found.session.id], access_ttl=self.ttl
                )
            else:
                ids = [caller.session_id] if caller.session_id else []
                revoked = await revoke(session, caller.user_id, "logout", ids, access_ttl=self.ttl)
        return len(revoked)

    async def list_sessions(self) -> list[SessionInfo]:
        caller = principal.current()
        async with self.deps.transaction() as session:
            rows = await store.live_sessions(session, caller.user_id)
        return [
            SessionInfo(
                id=row.id,
                created_at=row.created_at,
                last_used_at=row.last_used_at,
                expires_at=row.expires_at,
                client_address=row.client_address,
                user_agent=row.user_agent,
                current=row.id == caller.session_id,
            )
            for row in rows
        ]

    async def revoke_session(self, session_id: str) -> None:
        caller = principal.current()
        async with self.deps.transaction() as session:
            row = await store.session_by_id(session, session_id)
            if row is None or row.user_id != caller.user_id:
                raise NotFound(f"you have no session {session_id}")
            await revoke(
                session, caller.user_id, "revoked_by_user", [session_id], access_ttl=self.ttl
            )
