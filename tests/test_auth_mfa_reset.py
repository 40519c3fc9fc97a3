"""TOTP MFA (enrol, confirm, login with and without a code, replay refused, disable) and
password reset through the Maildir, over the real mesh."""

from __future__ import annotations

import asyncio
import urllib.parse

import grpc
import pytest
from grpc import aio
from sqlalchemy import text

from learnmesh.auth.v1 import auth_pb2
from tests.conftest import PASSWORD, Mesh, bearer
from tests.support.mesh import (
    audit_events,
    introspect,
    mails_to,
    new_email,
    reset_token_in,
    wait_for_mail,
)
from tests.support.status import error_reason, violations
from tests.support.totp import code_at, start_of_a_quiet_step


async def login(
    mesh: Mesh, email: str, password: str = PASSWORD, code: str = ""
) -> auth_pb2.LoginResponse:
    response: auth_pb2.LoginResponse = await mesh.auth.Login(
        auth_pb2.LoginRequest(email=email, password=password, mfa_code=code)
    )
    return response


async def test_mfa_enrol_confirm_login_replay_disable(mesh: Mesh) -> None:
    email = new_email("mfa")
    registered = await mesh.register(email)
    me = bearer(registered.access_token)

    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.ConfirmMfa(
            auth_pb2.ConfirmMfaRequest(code="123456", password=PASSWORD), metadata=me
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.DisableMfa(
            auth_pb2.DisableMfaRequest(code="123456", password=PASSWORD), metadata=me
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # Enrolling twice before confirming replaces the secret.
    first = await mesh.auth.EnrollMfa(auth_pb2.EnrollMfaRequest(password=PASSWORD), metadata=me)
    enrolment = await mesh.auth.EnrollMfa(auth_pb2.EnrollMfaRequest(password=PASSWORD), metadata=me)
    secret = enrolment.secret
    assert secret != first.secret
    assert len(secret) == 32  # base32: 160 bits
    uri = urllib.parse.urlparse(enrolment.otpauth_uri)
    assert (uri.scheme, uri.netloc) == ("otpauth", "totp")
    assert urllib.parse.unquote(uri.path) == f"/learnmesh:{email}"
    query = urllib.parse.parse_qs(uri.query)
    assert query["secret"] == [secret]
    assert query["issuer"] == ["learnmesh"]
    # The secret is stored encrypted, never as it is.
    async with mesh.runtime.db.transaction() as session:
        stored = (
            await session.execute(
                text("SELECT key_id, ciphertext, enabled FROM auth_mfa WHERE user_id = :u"),
                {"u": registered.user.id},
            )
        ).one()
    assert stored.key_id
    assert secret.encode() not in bytes(stored.ciphertext)
    assert not stored.enabled

    # MFA is not on until confirmed: a login without a code works.
    await login(mesh, email)

    step = await start_of_a_quiet_step()
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.ConfirmMfa(
            auth_pb2.ConfirmMfaRequest(code=code_at(first.secret, step), password=PASSWORD),
            metadata=me,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(err.value)) == {"code"}
    with pytest.raises(aio.AioRpcError) as err:  # two steps back: outside the window
        await mesh.auth.ConfirmMfa(
            auth_pb2.ConfirmMfaRequest(code=code_at(secret, step - 2), password=PASSWORD),
            metadata=me,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await mesh.auth.ConfirmMfa(
        auth_pb2.ConfirmMfaRequest(code=code_at(secret, step - 1), password=PASSWORD), metadata=me
    )
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.EnrollMfa(auth_pb2.EnrollMfaRequest(password=PASSWORD), metadata=me)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # The right password without a code: MFA_REQUIRED, not counted as a failure.
    with pytest.raises(aio.AioRpcError) as err:
        await login(mesh, email)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(err.value) == "MFA_REQUIRED"
    # A wrong password with no code is still just a wrong password.
    with pytest.raises(aio.AioRpcError) as err:
        await login(mesh, email, "definitely not it")
    assert error_reason(err.value) == "INVALID_CREDENTIALS"

    current = code_at(secret, step)
    signed_in = await login(mesh, email, code=current)
    assert signed_in.user.id == registered.user.id
    # The same code again, and an older step's code: refused.
    for replayed in (current, code_at(secret, step - 1)):
        with pytest.raises(aio.AioRpcError) as err:
            await login(mesh, email, code=replayed)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.value.details() == "email or password is incorrect"
    # A good code with a wrong password does not get in either.
    with pytest.raises(aio.AioRpcError) as err:
        await login(mesh, email, "definitely not it", code=code_at(secret, step + 1))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # Disabling needs an unused code too.
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.DisableMfa(
            auth_pb2.DisableMfaRequest(code=current, password=PASSWORD), metadata=me
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(err.value)) == {"code"}
    await mesh.auth.DisableMfa(
        auth_pb2.DisableMfaRequest(code=code_at(secret, step + 1), password=PASSWORD), metadata=me
    )
    assert (await login(mesh, email)).user.id == registered.user.id

    events = await audit_events(mesh, registered.user.id)
    names = [event for event, _ in events]
    assert names.count("mfa.enabled") == 1
    assert names.count("mfa.disabled") == 1
    mfa_failures = [d for e, d in events if e == "login.failed" and d.get("reason") == "mfa"]
    assert len(mfa_failures) == 2
    successes = [d for e, d in events if e == "login.succeeded"]
    assert [d["mfa"] for d in successes] == [False, True, False]
    # Secrets and codes never reach the audit trail.
    assert secret not in str(events)
    assert current not in str(events)


async def test_password_reset(mesh: Mesh) -> None:
    email = new_email("reset")
    registered = await mesh.register(email)
    other_session = await login(mesh, email)

    await mesh.auth.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(email=email.upper()))
    (body,) = await wait_for_mail(mesh.mail_dir, email)
    token = reset_token_in(body)
    public_url = mesh.settings.auth.public_url.rstrip("/")
    assert f"{public_url}/reset-password?token={token}" in body
    # The token is stored only as a digest.
    async with mesh.runtime.db.transaction() as session:
        stored = await session.scalar(
            text("SELECT count(*) FROM auth_password_resets WHERE token_hash = :t"), {"t": token}
        )
    assert stored == 0

    new_password = "a brand new passphrase"
    await mesh.auth.ResetPassword(
        auth_pb2.ResetPasswordRequest(token=token, new_password=new_password)
    )
    with pytest.raises(aio.AioRpcError) as err:
        await login(mesh, email)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await login(mesh, email, new_password)).user.id == registered.user.id

    # Every session from before the reset has ended.
    for refresh_token in (registered.refresh_token, other_session.refresh_token):
        with pytest.raises(aio.AioRpcError) as err:
            await mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token=refresh_token))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    found = await introspect(mesh, registered.access_token)
    assert not found.active

    # Single use: the same token again changes nothing.
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.ResetPassword(
            auth_pb2.ResetPasswordRequest(token=token, new_password="yet another passphrase")
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err.value) == {"token": "the reset token is invalid or has expired"}
    assert (await login(mesh, email, new_password)).user.id == registered.user.id

    events = [event for event, _ in await audit_events(mesh, registered.user.id)]
    assert events.count("password_reset.requested") == 1
    assert events.count("password.reset") == 1
    assert token not in str(await audit_events(mesh, registered.user.id))


async def test_reset_with_an_unknown_token_changes_nothing(mesh: Mesh) -> None:
    email = new_email("noreset")
    await mesh.register(email)
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.ResetPassword(
            auth_pb2.ResetPasswordRequest(token="z" * 43, new_password="hijacked password!")
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(err.value)) == {"token"}
    assert (await login(mesh, email)).access_token


async def test_reset_request_answers_the_same_for_unknown_emails(mesh: Mesh) -> None:
    known, unknown = new_email("known"), new_email("unknown")
    await mesh.register(known)
    answers = []
    for email in (known, unknown):
        answers.append(
            await mesh.auth.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(email=email))
        )
    assert answers[0] == answers[1] == auth_pb2.RequestPasswordResetResponse()
    await wait_for_mail(mesh.mail_dir, known)
    await asyncio.sleep(0.3)
    assert mails_to(mesh.mail_dir, unknown) == []


async def test_reset_requests_are_limited_per_hour(mesh: Mesh) -> None:
    email = new_email("flood")
    await mesh.register(email)
    limit = mesh.settings.auth.reset_requests_per_hour
    for _ in range(limit + 2):
        await mesh.auth.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(email=email))
    await wait_for_mail(mesh.mail_dir, email, count=limit)
    await asyncio.sleep(0.3)
    assert len(mails_to(mesh.mail_dir, email)) == limit


async def test_one_code_used_concurrently_wins_once(mesh: Mesh) -> None:
    email = new_email("mfarace")
    registered = await mesh.register(email)
    me = bearer(registered.access_token)
    secret = (
        await mesh.auth.EnrollMfa(auth_pb2.EnrollMfaRequest(password=PASSWORD), metadata=me)
    ).secret
    step = await start_of_a_quiet_step()
    await mesh.auth.ConfirmMfa(
        auth_pb2.ConfirmMfaRequest(code=code_at(secret, step - 1), password=PASSWORD), metadata=me
    )
    code = code_at(secret, step)
    results = await asyncio.gather(
        login(mesh, email, code=code), login(mesh, email, code=code), return_exceptions=True
    )
    assert sum(isinstance(r, auth_pb2.LoginResponse) for r in results) == 1
    refused = [r for r in results if isinstance(r, aio.AioRpcError)]
    assert [r.code() for r in refused] == [grpc.StatusCode.UNAUTHENTICATED]
