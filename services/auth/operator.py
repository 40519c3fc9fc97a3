"""What an operator does to auth data from a shell where the database is (``learnmesh users
reset-mfa``), with no server and no token: the same rules and audit trail as the RPCs."""

from __future__ import annotations

from learnmesh.db import Database
from services.auth import store
from services.auth.mfa_enrolment import MfaReset, reset_mfa


async def reset_mfa_by_email(
    db: Database, email: str, operator: str, *, access_ttl: int
) -> tuple[str, MfaReset] | None:
    """Resets the MFA of the account with ``email`` (its user id and what was done), or
    None when no account has it. Audited as ``mfa.reset`` by ``operator:<name>``; the
    ``session.revoked`` event waits in the outbox for the auth service's relay."""
    async with db.transaction() as session:
        credentials = await store.credentials_by_email(session, email.strip().lower())
        if credentials is None:
            return None
        done = await reset_mfa(
            session,
            credentials.user_id,
            actor=f"operator:{operator}"[:64],
            via="cli",
            access_ttl=access_ttl,
        )
    return credentials.user_id, done
