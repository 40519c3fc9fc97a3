"""Access tokens: verified with a stock JWT library against GetJwks; forged ones refused;
IntrospectToken; signing-key and MFA-key rotation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc import aio

from learnmesh import config
from learnmesh.auth.v1 import auth_pb2
from learnmesh.user.v1 import user_pb2
from services.auth import mfa
from services.auth.keys import KeyRing, create_key
from tests.conftest import Mesh, bearer
from tests.support.mesh import introspect, new_email, signing_key
from tests.support.status import error_reason


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


async def jwks(mesh: Mesh) -> jwt.PyJWKSet:
    response = await mesh.auth.GetJwks(auth_pb2.GetJwksRequest())
    return jwt.PyJWKSet.from_dict(
        {"keys": [{f.name: v for f, v in k.ListFields()} for k in response.keys]}
    )


@pytest.fixture(scope="module")
async def account(mesh: Mesh) -> auth_pb2.LoginResponse:
    email = new_email("tokens")
    await mesh.register(email)
    response: auth_pb2.LoginResponse = await mesh.auth.Login(
        auth_pb2.LoginRequest(email=email, password="correct horse battery staple")
    )
    return response


async def get_me(mesh: Mesh, token: str) -> user_pb2.GetMeResponse:
    response: user_pb2.GetMeResponse = await mesh.user.GetMe(
        user_pb2.GetMeRequest(), metadata=bearer(token)
    )
    return response


async def test_access_token_verifies_with_stock_pyjwt_against_jwks(
    mesh: Mesh, account: auth_pb2.LoginResponse
) -> None:
    response = await mesh.auth.GetJwks(auth_pb2.GetJwksRequest())
    assert len(response.keys) >= 1
    for key in response.keys:
        assert (key.kty, key.crv, key.alg, key.use) == ("EC", "P-256", "ES256", "sig")
        assert key.kid and key.x and key.y

    header = jwt.get_unverified_header(account.access_token)
    assert header["alg"] == "ES256"
    keys = await jwks(mesh)
    claims = jwt.decode(
        account.access_token,
        keys[header["kid"]].key,
        algorithms=["ES256"],
        audience=mesh.settings.auth.audience,
        issuer=mesh.settings.auth.issuer,
        options={"require": ["iss", "aud", "sub", "exp", "iat", "jti"]},
    )
    assert claims["sub"] == account.user.id
    assert claims["exp"] - int(claims["iat"]) == 900  # iat to the millisecond, exp whole
    assert abs(claims["iat"] - time.time()) < 60
    uuid.UUID(claims["jti"])
    assert claims["roles"] == ["free_user"]
    assert claims["tier"] == "free"
    assert claims["sid"]
    # The kid is the key's RFC 7638 thumbprint.
    public = keys[header["kid"]].key.public_numbers()
    canonical = json.dumps(
        {
            "crv": "P-256",
            "kty": "EC",
            "x": b64url(public.x.to_bytes(32, "big")),
            "y": b64url(public.y.to_bytes(32, "big")),
        },
        separators=(",", ":"),
    )
    assert header["kid"] == b64url(hashlib.sha256(canonical.encode()).digest())


async def test_forged_access_tokens_are_refused(
    mesh: Mesh, account: auth_pb2.LoginResponse
) -> None:
    kid, private_key = signing_key(mesh)
    header_b64, payload_b64, signature_b64 = account.access_token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4)))
    now = int(time.time())

    def signed(changes: dict[str, Any], key: Any = private_key, key_id: str = kid) -> str:
        return jwt.encode({**claims, **changes}, key, algorithm="ES256", headers={"kid": key_id})

    # Control: the harness signs tokens the mesh accepts, so each refusal below is due to
    # the one thing that was changed.
    assert (await get_me(mesh, signed({"jti": str(uuid.uuid4())}))).user.id == account.user.id
    assert (await get_me(mesh, account.access_token)).user.id == account.user.id

    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs256_input = f"{b64url_json({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{payload_b64}"
    hs256_mac = hmac.new(public_pem, hs256_input.encode(), hashlib.sha256).digest()
    hs256 = f"{hs256_input}.{b64url(hs256_mac)}"
    other_key = ec.generate_private_key(ec.SECP256R1())
    tampered_payload = b64url_json({**claims, "sub": str(uuid.uuid4())})

    forged = {
        "alg none": f"{b64url_json({'alg': 'none', 'typ': 'JWT', 'kid': kid})}.{payload_b64}.",
        "alg none, no kid": f"{b64url_json({'alg': 'none'})}.{payload_b64}.",
        "HS256 with the public key as secret": hs256,
        "expired": signed({"iat": now - 3600, "exp": now - 1800}),
        "wrong aud": signed({"aud": "someone-else"}),
        "wrong iss": signed({"iss": "https://evil.example"}),
        "unknown kid": signed({}, other_key, "not-a-known-kid"),
        "known kid, other key": signed({}, other_key, kid),
        "tampered payload": f"{header_b64}.{tampered_payload}.{signature_b64}",
        "no signature": f"{header_b64}.{payload_b64}.",
        "garbage": "not.a.jwt",
    }
    for name, token in forged.items():
        with pytest.raises(aio.AioRpcError) as err:
            await get_me(mesh, token)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        found = await introspect(mesh, token)
        assert not found.active, name

    with pytest.raises(aio.AioRpcError) as err:
        await mesh.user.GetMe(user_pb2.GetMeRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.user.GetMe(
            user_pb2.GetMeRequest(), metadata=(("authorization", f"Basic {account.access_token}"),)
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    expired = forged["expired"]
    with pytest.raises(aio.AioRpcError) as err:
        await get_me(mesh, expired)
    assert error_reason(err.value) == "TOKEN_EXPIRED"


async def test_introspect_active_then_inactive_after_logout(mesh: Mesh) -> None:
    registered = await mesh.register(new_email("introspect"))
    found = await introspect(mesh, registered.access_token)
    assert found.active
    assert found.subject == registered.user.id
    assert list(found.roles) == ["free_user"]
    assert found.tier == "free"
    assert found.session_id
    assert 800 < found.expires_at.seconds - time.time() <= 900

    await mesh.auth.Logout(auth_pb2.LogoutRequest(), metadata=bearer(registered.access_token))
    after = await introspect(mesh, registered.access_token)
    assert not after.active
    assert after.subject == ""
    for garbage in ("x", "a.b.c", "eyJhbGciOiJFUzI1NiJ9.e30.AAAA"):
        found = await introspect(mesh, garbage)
        assert not found.active


async def test_signing_keys_rotate(tmp_path: Path) -> None:
    """A new key in the directory: published next to the old one, and signs from then on;
    ``jwt_active_kid`` pins a key."""
    base = config.load(env={})
    settings = replace(base, var_dir=str(tmp_path))
    ring = KeyRing(settings, rescan_every=0)
    await ring.start()
    old = await ring.active()
    assert (old.path.stat().st_mode & 0o777) == 0o600
    new_path = create_key(old.path.parent)
    os.utime(new_path, (old.modified + 10, old.modified + 10))
    new = await ring.active()
    assert new.kid == new_path.stem != old.kid
    assert {k["kid"] for k in await ring.jwks()} == {old.kid, new.kid}

    pinned = KeyRing(replace(settings, auth=replace(settings.auth, jwt_active_kid=old.kid)))
    await pinned.start()
    assert (await pinned.active()).kid == old.kid
    with pytest.raises(config.ConfigError, match="jwt_active_kid"):
        await KeyRing(
            replace(settings, auth=replace(settings.auth, jwt_active_kid="missing"))
        ).start()


def test_mfa_keys_rotate_and_bind_the_user() -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    old_box = mfa.SecretBox([("k1", old_key)])
    sealed = old_box.seal("user-1", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
    spec = f"k2:{base64.b64encode(new_key).decode()},k1:{base64.b64encode(old_key).decode()}"
    rotated = mfa.SecretBox(mfa.parse_keys(spec))
    assert rotated.open("user-1", sealed) == "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    assert rotated.seal("user-1", "X").key_id == "k2"
    with pytest.raises(mfa.InvalidTag):
        rotated.open("user-2", sealed)
    with pytest.raises(config.ConfigError, match=r"auth\.mfa_keys"):
        mfa.parse_keys("k1:c2hvcnQ=")
