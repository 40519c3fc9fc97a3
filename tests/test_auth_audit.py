"""The audit trail over the wire: the server's call id beside the caller's request id (in
both services' tables), and the security events that used to leave no trace."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from grpc import aio
from sqlalchemy import text

from learnmesh.auth.v1 import auth_pb2
from tests.conftest import PASSWORD, Mesh, bearer
from tests.support.mesh import audit_events, new_email, reset_token_in, signing_key, wait_for_mail
from tests.support.status import violations

CALL_ID = re.compile(r"[0-9a-f]{32}")


async def audit_rows(mesh: Mesh, table: str, subject: str) -> list[tuple[str, str, str]]:
    """(event, request_id, call_id) of the subject's rows in ``table``, oldest first."""
    async with mesh.runtime.db.transaction() as session:
        rows = await session.execute(
            text(f"SELECT event, request_id, call_id FROM {table} WHERE subject = :s ORDER BY at"),
            {"s": subject},
        )
        return [(r.event, r.request_id, r.call_id) for r in rows.all()]


async def test_audit_rows_keep_the_call_id_beside_the_callers_request_id(mesh: Mesh) -> None:
    """Two calls sending the same request id: both rows keep it, and each gets its own
    server-made call id (in auth_audit and, for the profile it made, in user_audit)."""
    chosen = ("x-request-id", "client-chosen-id-1")
    first = await mesh.auth.Register(
        auth_pb2.RegisterRequest(
            email=new_email("callid"),
            password="correct horse battery staple",
            display_name="Call Id",
            accepted_terms=True,
        ),
        metadata=(chosen,),
    )
    await mesh.auth.Logout(
        auth_pb2.LogoutRequest(),
        metadata=(chosen, ("authorization", f"Bearer {first.access_token}")),
    )
    rows = await audit_rows(mesh, "auth_audit", first.user.id)
    assert [event for event, _, _ in rows] == ["account.registered", "session.revoked"]
    assert {request_id for _, request_id, _ in rows} == {"client-chosen-id-1"}
    call_ids = [call_id for _, _, call_id in rows]
    assert all(CALL_ID.fullmatch(c) for c in call_ids), call_ids
    assert len(set(call_ids)) == 2

    # The user service's own row: the request id travelled with the inner CreateUser call,
    # the call id is the user service's own for that call.
    ((event, request_id, call_id),) = await audit_rows(mesh, "user_audit", first.user.id)
    assert (event, request_id) == ("user.created", "client-chosen-id-1")
    assert CALL_ID.fullmatch(call_id)
    assert call_id not in call_ids


def request_id() -> tuple[str, str]:
    return ("x-request-id", f"audit-{uuid.uuid4().hex}")


async def events_of(mesh: Mesh, rid: tuple[str, str]) -> list[tuple[str, str, dict[str, Any]]]:
    """(event, subject, details) of the rows made by calls with this request id."""
    async with mesh.runtime.db.transaction() as session:
        rows = await session.execute(
            text(
                "SELECT event, subject, details FROM auth_audit WHERE request_id = :r "
                "ORDER BY at, id"
            ),
            {"r": rid[1]},
        )
        return [(r.event, r.subject, json.loads(r.details)) for r in rows.all()]


async def test_unknown_and_ended_refresh_tokens_are_audited(mesh: Mesh) -> None:
    rid = request_id()
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token="q" * 43), metadata=(rid,))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await events_of(mesh, rid) == [("refresh_token.rejected", "", {"reason": "unknown"})]

    registered = await mesh.register(new_email("ended"))
    await mesh.auth.Logout(auth_pb2.LogoutRequest(), metadata=bearer(registered.access_token))
    rid = request_id()
    with pytest.raises(aio.AioRpcError):
        await mesh.auth.Refresh(
            auth_pb2.RefreshRequest(refresh_token=registered.refresh_token), metadata=(rid,)
        )
    ((event, subject, details),) = await events_of(mesh, rid)
    assert (event, subject, details["reason"]) == (
        "refresh_token.rejected",
        registered.user.id,
        "session_ended",
    )
    assert registered.refresh_token not in json.dumps(details)


async def test_refused_reset_tokens_are_audited(mesh: Mesh) -> None:
    request = auth_pb2.ResetPasswordRequest(token="n" * 43, new_password="a new long password")
    rid = request_id()
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.ResetPassword(request, metadata=(rid,))
    assert violations(err.value) == {"token": "the reset token is invalid or has expired"}
    assert await events_of(mesh, rid) == [
        ("password_reset.token_rejected", "", {"reason": "unknown"})
    ]

    email = new_email("resetaudit")
    registered = await mesh.register(email)
    for _ in range(2):
        await mesh.auth.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(email=email))
    first, second = (reset_token_in(m) for m in await wait_for_mail(mesh.mail_dir, email, 2))
    await mesh.auth.ResetPassword(
        auth_pb2.ResetPasswordRequest(token=first, new_password="a new long password")
    )
    # The other token was spent by the reset: "used". An expired one: "expired".
    async with mesh.runtime.db.transaction() as session:
        await session.execute(
            text(
                "UPDATE auth_password_resets SET used_at = NULL, expires_at = :past "
                "WHERE user_id = :u AND token_hash = :h"
            ),
            {
                "past": datetime.now(UTC) - timedelta(minutes=1),
                "u": registered.user.id,
                "h": hashlib.sha256(first.encode()).hexdigest(),
            },
        )
    for token, reason in ((second, "used"), (first, "expired")):
        rid = request_id()
        with pytest.raises(aio.AioRpcError) as err:
            await mesh.auth.ResetPassword(
                auth_pb2.ResetPasswordRequest(token=token, new_password="hijacked password!"),
                metadata=(rid,),
            )
        assert violations(err.value) == {"token": "the reset token is invalid or has expired"}
        assert await events_of(mesh, rid) == [
            ("password_reset.token_rejected", registered.user.id, {"reason": reason})
        ]
    # Unknown emails asking for a reset leave a trace too (with no subject).
    rid = request_id()
    nobody = new_email("nobody")
    await mesh.auth.RequestPasswordReset(
        auth_pb2.RequestPasswordResetRequest(email=nobody), metadata=(rid,)
    )
    for _ in range(100):
        if found := await events_of(mesh, rid):
            break
        await asyncio.sleep(0.05)
    assert found == [("password_reset.unknown_email", "", {"email": nobody})]


async def test_forged_and_unknown_tokens_at_introspection_are_audited(mesh: Mesh) -> None:
    registered = await mesh.register(new_email("introaudit"))
    claims = jwt.decode(registered.access_token, options={"verify_signature": False})
    kid, key = signing_key(mesh)

    def signed(changes: dict[str, Any], with_key: Any = key) -> str:
        return jwt.encode({**claims, **changes}, with_key, algorithm="ES256", headers={"kid": kid})

    stranger = ec.generate_private_key(ec.SECP256R1())
    someone_else = str(uuid.uuid4())
    expired = signed({"exp": int(time.time()) - 3600, "iat": int(time.time()) - 4000})
    cases: list[tuple[str, list[tuple[str, str, str]]]] = [
        ("not.a.jwt", [("access_token.rejected", "", "invalid")]),
        (signed({}, stranger), [("access_token.rejected", "", "invalid")]),
        (
            signed({"sid": str(uuid.uuid4())}),
            [("access_token.rejected", registered.user.id, "unknown_session")],
        ),
        (
            signed({"sub": someone_else}),
            [("access_token.rejected", someone_else, "subject_mismatch")],
        ),
        # Expired tokens are ordinary, not audited; nor is a good one.
        (expired, []),
        (registered.access_token, []),
    ]
    for token, expected in cases:
        rid = request_id()
        found = await mesh.auth_as("user").IntrospectToken(
            auth_pb2.IntrospectTokenRequest(token=token), metadata=(rid,)
        )
        assert found.active == (token == registered.access_token)
        got = [(e, s, d["reason"]) for e, s, d in await events_of(mesh, rid)]
        assert got == expected, token
        for _, _, details in await events_of(mesh, rid):
            assert token not in json.dumps(details)
            assert details["caller"].endswith("/service/user")


async def test_mfa_enrolment_and_wrong_confirm_codes_are_audited(mesh: Mesh) -> None:
    registered = await mesh.register(new_email("mfaaudit"))
    me = bearer(registered.access_token)
    await mesh.auth.EnrollMfa(auth_pb2.EnrollMfaRequest(password=PASSWORD), metadata=me)
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.ConfirmMfa(
            auth_pb2.ConfirmMfaRequest(code="000000", password=PASSWORD), metadata=me
        )
    assert set(violations(err.value)) == {"code"}
    events = [(e, d) for e, d in await audit_events(mesh, registered.user.id)]
    assert ("mfa.enrolment_started", {}) in events
    assert ("mfa.code_rejected", {"action": "confirm"}) in events
