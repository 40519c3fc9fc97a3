"""Access-token verification: the one place an access token is checked.

The server's auth link and the auth service's IntrospectToken both verify through here
(pinned ES256, ``iss``, ``aud``, expiry, required claims, a known ``kid``), against the
auth service's JWK Set.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import jwt
from grpc import aio

from learnmesh.kernel.errors import Unauthenticated, Unavailable
from learnmesh.kernel.principal import Principal

log = logging.getLogger("learnmesh.auth")

ALGORITHM = "ES256"
REQUIRED_CLAIMS = ("iss", "aud", "sub", "exp", "iat", "jti")
LEEWAY = 5  # seconds of clock skew tolerated on exp/iat

JwksFetch = Callable[[], Awaitable[Sequence[Mapping[str, Any]]]]


class TokenRejected(Unauthenticated):
    """A bad access token; ``why`` is a fixed word for the audit trail (the caller sees
    the same status and message as for any Unauthenticated)."""

    def __init__(self, message: str, why: str, *, reason: str = "") -> None:
        super().__init__(message, reason=reason)
        self.why = why


# PyJWT's errors, most specific first, as the words of the audit trail.
_WHY: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.InvalidIssuerError, "wrong_issuer"),
    (jwt.InvalidAudienceError, "wrong_audience"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.DecodeError, "malformed"),
)


def _why(exc: jwt.PyJWTError) -> str:
    return next((why for kind, why in _WHY if isinstance(exc, kind)), "invalid_claims")


class JwksCache:
    """The auth service's public keys: fetched at start, refreshed in the background, and
    refetched on an unknown ``kid``.

    Fetches never run on a caller's time: each is a task of its own in a fresh context (so
    no inbound deadline shortens it), shared by every caller waiting for it. A caller whose
    deadline ends while it waits is cancelled like any other work (DEADLINE_EXCEEDED), and
    the fetch goes on for the next caller. Refetches are rate-limited (``min_refetch``
    seconds apart) so forged tokens with random ``kid`` values cannot turn into a flood of
    JWKS calls; keys are refreshed every ``max_age`` seconds so a removed key stops
    verifying. UNAVAILABLE only when no key was ever fetched and the last fetch failed.
    """

    def __init__(self, fetch: JwksFetch, *, min_refetch: float = 1.0, max_age: float = 300.0):
        self._fetch = fetch
        self._keys: dict[str, Any] = {}
        self._fetched_at = float("-inf")
        self._tried_at = float("-inf")
        self._min_refetch = min_refetch
        self._max_age = max_age
        self._fetching: asyncio.Task[None] | None = None
        self._background: asyncio.Task[None] | None = None
        self._failure = ""

    def start(self) -> None:
        """Fetches now and keeps the keys fresh in the background until ``aclose``."""
        if self._background is None:
            self._background = asyncio.create_task(
                self._keep_fresh(), name="jwks-refresh", context=contextvars.Context()
            )

    async def aclose(self) -> None:
        for task in (self._background, self._fetching):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._background = self._fetching = None

    async def _keep_fresh(self) -> None:
        delay = 0.2
        while True:
            await self._refreshed()
            if self._keys and time.monotonic() - self._fetched_at < self._max_age:
                delay = 0.2
                await asyncio.sleep(self._max_age / 2)
            else:  # not fetched yet: retry soon, backing off to 30 s
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def key(self, kid: str) -> Any | None:
        now = time.monotonic()
        stale = now - self._fetched_at > self._max_age
        running = self._fetching is not None and not self._fetching.done()
        due = now - self._tried_at >= self._min_refetch
        if ((kid not in self._keys or stale) and due) or (not self._keys and running):
            await self._refreshed()
        if not self._keys:
            raise Unavailable(
                f"cannot verify tokens: no signing keys from the auth service yet ({self._failure})"
            )
        return self._keys.get(kid)

    async def _refreshed(self) -> None:
        """Waits for the current fetch (starting one when none runs)."""
        task = self._fetching
        if task is None or task.done():
            self._tried_at = time.monotonic()
            task = self._fetching = asyncio.create_task(
                self._refresh(), name="jwks-fetch", context=contextvars.Context()
            )
        await asyncio.shield(task)

    async def _refresh(self) -> None:
        try:
            jwks = await self._fetch()
        except Exception as exc:
            code = exc.code() if isinstance(exc, aio.AioRpcError) else None
            self._failure = code.name if code is not None else type(exc).__name__
            log.warning("could not fetch the JWKS: %s", self._failure)
            return
        keys: dict[str, Any] = {}
        for jwk in jwks:
            if jwk.get("alg") == ALGORITHM and jwk.get("kid"):
                keys[jwk["kid"]] = jwt.PyJWK(dict(jwk), ALGORITHM).key
        self._keys = keys
        self._fetched_at = time.monotonic()
        self._failure = ""


async def verified_claims(
    token: str,
    key_for: Callable[[str], Awaitable[Any | None]],
    *,
    issuer: str,
    audience: str,
) -> dict[str, Any]:
    """The claims of an access token whose signature (ES256 only, a known ``kid``),
    issuer, audience, expiry and required claims are good; Unauthenticated otherwise.

    The one place access tokens are checked: the server's auth link and the auth service's
    IntrospectToken both call it. ``roles`` is always a list of strings in the result.
    """
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise TokenRejected("the access token is malformed", "malformed") from None
    if header.get("alg") != ALGORITHM:
        raise TokenRejected(f"the access token must be signed with {ALGORITHM}", "algorithm")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise TokenRejected("the access token has no key id (kid)", "no_kid")
    key = await key_for(kid)
    if key is None:
        raise TokenRejected("the access token was signed with an unknown key", "unknown_kid")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=audience,
            issuer=issuer,
            leeway=LEEWAY,
            options={"require": list(REQUIRED_CLAIMS)},
        )
    except jwt.ExpiredSignatureError:
        raise TokenRejected(
            "the access token has expired", "expired", reason="TOKEN_EXPIRED"
        ) from None
    except jwt.PyJWTError as exc:
        raise TokenRejected(f"the access token is not valid: {exc}", _why(exc)) from None
    roles = claims.setdefault("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise TokenRejected("the access token's roles claim is malformed", "invalid_claims")
    return claims


class TokenVerifier:
    """Verifies access tokens; remembers recent good ones until they expire.

    An ES256 verification costs about as much as a whole trivial gRPC call, so a token that
    verified once is not verified again while cached (the cache key is the whole token,
    and expiry is still checked on every call).
    """

    def __init__(self, keys: JwksCache, *, issuer: str, audience: str, cache_size: int = 4096):
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self._cache: OrderedDict[str, Principal] = OrderedDict()
        self._cache_size = cache_size

    async def verify(self, token: str) -> Principal:
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at + LEEWAY > time.time():
                self._cache.move_to_end(token)
                return cached
            del self._cache[token]
        claims = await verified_claims(
            token, self.keys.key, issuer=self.issuer, audience=self.audience
        )
        roles = claims["roles"]
        found = Principal(
            user_id=str(claims["sub"]),
            roles=frozenset(roles),
            tier=str(claims.get("tier", "free")),
            session_id=str(claims.get("sid", "")),
            token_id=str(claims["jti"]),
            expires_at=float(claims["exp"]),
            issued_at=float(claims["iat"]),
        )
        self._cache[token] = found
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return found
