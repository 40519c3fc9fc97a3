"""Registration: credentials here, the profile in the user service, then a first session.

The credentials row is committed as "pending" before the profile is asked for, so the
unique email decides concurrent registrations; it turns "active" once the profile exists.
When the user service may or may not have made the profile (a timeout), the pending row
stays and the next Register of the email retries with the same user id (CreateUser is
idempotent by id), so no profile is orphaned.
"""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError

from learnmesh import audit
from learnmesh.kernel.errors import AlreadyExists
from services.auth import store
from services.auth.deps import Deps
from services.auth.sessions import Sessions, SignedIn
from services.auth.users import ACCOUNT_EXISTS, ProfileNotCreated


class Registration:
    def __init__(self, deps: Deps, sessions: Sessions) -> None:
        self.deps = deps
        self.sessions = sessions

    async def register(self, email: str, password: str, display_name: str) -> SignedIn:
        """Creates the credentials, then the profile (user service), then signs in."""
        deps = self.deps
        email = email.lower()
        password_hash = await deps.passwords.hash(password)
        user_id = await self._reserve(email, password_hash)
        try:
            user = await deps.users.create(user_id, email, display_name)
        except (AlreadyExists, ProfileNotCreated) as exc:
            if not getattr(exc, "maybe_created", False):
                async with deps.transaction() as session:
                    await store.delete_pending(session, user_id, password_hash)
            raise
        async with deps.transaction() as session:
            if not await store.activate(session, user_id, password_hash):
                # A concurrent Register of the same email took the pending row over.
                raise AlreadyExists(ACCOUNT_EXISTS)
            signed_in = await self.sessions.start(session, user_id, user)
            await audit.record(
                session, store.audit, "account.registered", user_id, session_id=signed_in.session_id
            )
        return signed_in

    async def _reserve(self, email: str, password_hash: str) -> str:
        """Commits a pending credentials row for ``email`` (or takes over one a crash left
        behind) and returns its user id; the unique email decides races."""
        try:
            async with self.deps.transaction() as session:
                existing = await store.credentials_by_email(session, email)
                if existing is None:
                    user_id = store.new_id()
                    await store.add_pending_credentials(session, user_id, email, password_hash)
                    return user_id
                if existing.status == store.ACTIVE:
                    raise AlreadyExists(ACCOUNT_EXISTS)
                if not await store.take_over_pending(session, existing.user_id, password_hash):
                    raise AlreadyExists(ACCOUNT_EXISTS)
                return existing.user_id
        except IntegrityError:
            raise AlreadyExists(ACCOUNT_EXISTS) from None
