"""Access-token verification: the one place an access token is checked.

The server's auth link and the auth service's IntrospectToken both verify through here
(pinned ES256, ``iss``, ``aud``, expiry, required claims, a known ``kid``), against the
auth service's JWK Set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import jwt

from learnmesh.kernel.errors import Unauthenticated, Unavailable
from learnmesh.kernel.principal import Principal

log = logging.getLogger("learnmesh.auth")

ALGORITHM = "ES256"
REQUIRED_CLAIMS = ("iss", "aud", "sub", "exp", "iat", "jti")
LEEWAY = 5  # seconds of clock skew tolerated on exp/iat

JwksFetch = Callable[[], Awaitable[Sequence[Mapping[str, Any]]]]


class JwksCache:
    """The auth service's public keys, fetched lazily and refetched on an unknown ``kid``.

    Refetches are rate-limited (``min_refetch`` seconds apart) so forged tokens with random
    ``kid`` values cannot turn into a flood of JWKS calls; a rotation is picked up without a
    restart. Keys are also refreshed every ``max_age`` seconds so a removed key stops
    verifying.
    """

    def __init__(self, fetch: JwksFetch, *, min_refetch: float = 1.0, max_age: float = 300.0):
        self._fetch = fetch
        self._keys: dict[str, Any] = {}
        self._fetched_at = float("-inf")
        self._min_refetch = min_refetch
        self._max_age = max_age
        self._lock = asyncio.Lock()

    async def key(self, kid: str) -> Any | None:
        now = time.monotonic()
        stale = now - self._fetched_at > self._max_age
        if (kid not in self._keys or stale) and now - self._fetched_at >= self._min_refetch:
            await self._refresh()
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._fetched_at < self._min_refetch:
                return  # another task refreshed while we waited
            try:
                jwks = await self._fetch()
            except Exception as exc:
                log.warning("could not fetch the JWKS: %s", exc)
                if not self._keys:
                    raise Unavailable(
                        "cannot verify tokens: the auth service is unreachable"
                    ) from None
                return
            keys: dict[str, Any] = {}
            for jwk in jwks:
                if jwk.get("alg") == ALGORITHM and jwk.get("kid"):
                    keys[jwk["kid"]] = jwt.PyJWK(dict(jwk), ALGORITHM).key
            self._keys = keys
            self._fetched_at = time.monotonic()


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
        raise Unauthenticated("the access token is malformed") from None
    if header.get("alg") != ALGORITHM:
        raise Unauthenticated(f"the access token must be signed with {ALGORITHM}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise Unauthenticated("the access token has no key id (kid)")
    key = await key_for(kid)
    if key is None:
        raise Unauthenticated("the access token was signed with an unknown key")
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
        raise Unauthenticated("the access token has expired", reason="TOKEN_EXPIRED") from None
    except jwt.PyJWTError as exc:
        raise Unauthenticated(f"the access token is not valid: {exc}") from None
    roles = claims.setdefault("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise Unauthenticated("the access token's roles claim is malformed")
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
        )
        self._cache[token] = found
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return found
