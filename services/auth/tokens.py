"""Access tokens (ES256 JWTs) and refresh tokens (opaque, stored only as a SHA-256 digest).

Access tokens are verified locally by every service's interceptor against the JWKS, so
they carry what authorisation needs: subject, roles, tier and the session (``sid``) they
belong to. Refresh tokens are random strings; the database keeps only their digest, so a
leaked table does not hand out sessions.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import jwt

from learnmesh.config import AuthSettings
from learnmesh.kernel.errors import Unauthenticated
from learnmesh.kernel.tokens import verified_claims
from services.auth.keys import ALGORITHM, KeyRing


@dataclass(frozen=True)
class AccessToken:
    token: str
    token_id: str
    expires_at: int
    expires_in: int


@dataclass(frozen=True)
class VerifiedToken:
    subject: str
    roles: tuple[str, ...]
    tier: str
    session_id: str
    expires_at: int
    issued_at: float = 0.0


@dataclass(frozen=True)
class Rejection:
    """Why an access token was refused: ``kind`` "expired" or "invalid" (forged, malformed,
    unknown key...), and the verifier's message (never the token)."""

    kind: str
    message: str


def new_refresh_token() -> tuple[str, str]:
    """A fresh opaque refresh token and the digest to store."""
    token = secrets.token_urlsafe(32)
    return token, digest(token)


def digest(token: str) -> str:
    """The SHA-256 of a refresh or reset token, as stored (hex)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Tokens:
    def __init__(self, keys: KeyRing, settings: AuthSettings) -> None:
        self.keys = keys
        self.issuer = settings.issuer
        self.audience = settings.audience
        self.ttl = settings.access_token_ttl

    async def issue(
        self, user_id: str, roles: Sequence[str], tier: str, session_id: str
    ) -> AccessToken:
        key = await self.keys.active()
        now = time.time()
        token_id = str(uuid.uuid4())
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": user_id,
            # To the millisecond (RFC 7519 NumericDates may have fractions): servers refuse a
            # user's tokens issued before a role change or a sign-out everywhere, and one
            # issued in the same second just after it must not be taken for an older one.
            "iat": round(now, 3),
            "exp": int(now) + self.ttl,
            "jti": token_id,
            "roles": list(roles),
            "tier": tier,
            "sid": session_id,
        }
        token = jwt.encode(
            claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": "JWT"}
        )
        return AccessToken(token, token_id, int(now) + self.ttl, self.ttl)

    async def verify(self, token: str) -> VerifiedToken | None:
        """The token's facts when its signature (known kid, ES256 only), issuer, audience
        and expiry are good; None otherwise (never an exception for a bad token)."""
        verified, _ = await self.check(token)
        return verified

    async def check(self, token: str) -> tuple[VerifiedToken | None, Rejection | None]:
        """Like ``verify``, with why a bad token was refused (for the audit trail)."""
        try:
            claims = await verified_claims(
                token, self.keys.public_key, issuer=self.issuer, audience=self.audience
            )
        except Unauthenticated as exc:
            kind = "expired" if exc.reason == "TOKEN_EXPIRED" else "invalid"
            return None, Rejection(kind, exc.message)
        roles = claims["roles"]
        session_id = claims.get("sid")
        if not isinstance(session_id, str) or not session_id:
            return None, Rejection("invalid", "the access token has no session (sid)")
        return VerifiedToken(
            subject=str(claims["sub"]),
            roles=tuple(roles),
            tier=str(claims.get("tier", "free")),
            session_id=session_id,
            expires_at=int(claims["exp"]),
            issued_at=float(claims["iat"]),
        ), None
