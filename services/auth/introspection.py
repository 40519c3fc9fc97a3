"""Token facts for the mesh: the JWK Set, and whether an access token is good right now.

Other services verify access tokens locally against the JWKS; IntrospectToken adds what a
signature cannot tell, that the token's session has not been revoked: in the database, and
in the process's revocation list (the one the auth link refuses from, so both agree on a
demoted or deleted user's older tokens too).
"""

from __future__ import annotations

from dataclasses import dataclass

from learnmesh.kernel import principal
from services.auth import store
from services.auth.deps import Deps
from services.auth.keys import KeyRing


@dataclass(frozen=True)
class TokenFacts:
    active: bool
    subject: str = ""
    roles: tuple[str, ...] = ()
    tier: str = ""
    expires_at: int = 0
    session_id: str = ""


class Introspection:
    def __init__(self, deps: Deps, keys: KeyRing) -> None:
        self.deps = deps
        self.keys = keys

    async def jwks(self) -> list[dict[str, str]]:
        return await self.keys.jwks()

    async def introspect(self, token: str) -> TokenFacts:
        """Whether the access token is good now, its session included; never an error.
        Forged or malformed tokens, and good signatures naming no session of theirs, are
        audited (expired tokens and revoked sessions are the ordinary inactive ones)."""
        verified, rejection = await self.deps.tokens.check(token)
        if verified is None:
            if rejection is not None and rejection.kind != "expired":
                await self._rejected("invalid", why=rejection.message)
            return TokenFacts(active=False)
        async with self.deps.transaction() as session:
            owner = await store.session_by_id(session, verified.session_id)
        if owner is None:
            await self._rejected(
                "unknown_session", verified.subject, session_id=verified.session_id
            )
            return TokenFacts(active=False)
        if owner.user_id != verified.subject:
            await self._rejected(
                "subject_mismatch", verified.subject, session_id=verified.session_id
            )
            return TokenFacts(active=False)
        if owner.revoked_at is not None:
            return TokenFacts(active=False)
        revocations = self.deps.runtime.revocations
        if revocations.session_revoked(verified.session_id) or revocations.issued_too_early(
            verified.subject, verified.issued_at
        ):
            return TokenFacts(active=False)
        return TokenFacts(
            active=True,
            subject=verified.subject,
            roles=verified.roles,
            tier=verified.tier,
            expires_at=verified.expires_at,
            session_id=verified.session_id,
        )

    async def _rejected(self, reason: str, subject: str = "", **details: str) -> None:
        caller = principal.call_info().peer_identity
        await self.deps.audit_now(
            "access_token.rejected", subject, reason=reason, caller=caller, **details
        )
