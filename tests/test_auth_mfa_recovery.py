"""MFA against a stolen access token, over the real mesh on SQLite and PostgreSQL: the
password is needed to enrol, confirm and disable (wrong ones are throttled and audited);
recovery codes at ConfirmMfa, single use, at Login and DisableMfa; the admin's ResetMfa and
the operator's `learnmesh users reset-mfa EMAIL`."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
from grpc import aio
from sqlalchemy import text

from learnmesh.auth.v1 import auth_pb2
from tests.conftest import ADMIN_EMAIL, PASSWORD, Mesh, bearer
from tests.support.mesh import audit_events, introspect, new_email
from tests.support.processes import Finished, python_module, run_to_end
from tests.support.status import error_reason, violations
from tests.support.totp import code_at, start_of_a_quiet_step

WRONG = "not the password at all"


@pytest.fixture(scope="module")
async def admin(mesh: Mesh) -> auth_pb2.RegisterResponse:
    return await mesh.register(ADMIN_EMAIL, name="The Admin")


async def with_mfa(mesh: Mesh) -> tuple[str, auth_pb2.RegisterResponse, str, list[str]]:
    """A new account with MFA on: (email, registration, secret, recovery codes)."""
    email = new_email("recovery")
    registered = await mesh.register(email)
    me = bearer(registered.access_token)
    secret = (
        await mesh.auth.EnrollMfa(auth_pb2.EnrollMfaRequest(password=PASSWORD), metadata=me)
    ).secret
    step = await start_of_a_quiet_step()
    confirmed = await mesh.auth.ConfirmMfa(
        auth_pb2.ConfirmMfaRequest(code=code_at(secret, step - 1), password=PASSWORD), metadata=me
    )
    return email, registered, secret, list(confirmed.recovery_codes)


async def login(mesh: Mesh, email: str, **codes: str) -> auth_pb2.LoginResponse:
    response: auth_pb2.LoginResponse = await mesh.auth.Login(
        auth_pb2.LoginRequest(email=email, password=PASSWORD, **codes)
    )
    return response


async def test_a_token_without_the_password_changes_no_mfa(mesh: Mesh) -> None:
    """A thief holding only the access token can neither enrol a secret of their own nor
    turn the owner's MFA off; each wrong password is audited and counts in the throttle."""
    email = new_email("stolen")
    registered = await mesh.register(email)
    me = bearer(registered.access_token)

    with pytest.raises(aio.AioRpcError) as err:  # no password at all: a field violation
        await mesh.auth.EnrollMfa(auth_pb2.EnrollMfaRequest(), metadata=me)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(err.value)) == {"password"}
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.EnrollMfa(auth_pb2.EnrollMfaRequest(password=WRONG), metadata=me)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err.value) == {
        "password": "the password is not this account's current password"
    }
    async with mesh.runtime.db.transaction() as session:
        pending = await session.scalar(
            text("SELECT count(*) FROM auth_mfa WHERE user_id = :u"), {"u": registered.user.id}
        )
    assert pending == 0

    # The owner turns MFA on; the thief cannot confirm a secret or disable it.
    secret = (
        await mesh.auth.EnrollMfa(auth_pb2.EnrollMfaRequest(password=PASSWORD), metadata=me)
    ).secret
    step = await start_of_a_quiet_step()
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.ConfirmMfa(
            auth_pb2.ConfirmMfaRequest(code=code_at(secret, step), password=WRONG), metadata=me
        )
    assert set(violations(err.value)) == {"password"}
    await mesh.auth.ConfirmMfa(
        auth_pb2.ConfirmMfaRequest(code=code_at(secret, step), password=PASSWORD), metadata=me
    )
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.DisableMfa(
            auth_pb2.DisableMfaRequest(code=code_at(secret, step + 1), password=WRONG),
            metadata=me,
        )
    assert set(violations(err.value)) == {"password"}
    # Still on: the password alone does not sign in.
    with pytest.raises(aio.AioRpcError) as err:
        await login(mesh, email)
    assert error_reason(err.value) == "MFA_REQUIRED"

    events = await audit_events(mesh, registered.user.id)
    rejected = [d["action"] for e, d in events if e == "mfa.password_rejected"]
    assert rejected == ["enroll", "confirm", "disable"]
    assert [e for e, _ in events].count("mfa.enrolment_started") == 1

    # Wrong passwords count as failed sign-ins: two more, and the account is throttled
    # for MFA calls and Login alike.
    for _ in range(mesh.settings.auth.throttle_per_email - len(rejected)):
        with pytest.raises(aio.AioRpcError) as err:
            await mesh.auth.DisableMfa(
                auth_pb2.DisableMfaRequest(code="123456", password=WRONG), metadata=me
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for call in (
        mesh.auth.DisableMfa(
            auth_pb2.DisableMfaRequest(code="123456", password=PASSWORD), metadata=me
        ),
        login(mesh, email, mfa_code="123456"),
    ):
        with pytest.raises(aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(err.value) == "LOGIN_THROTTLED"


async def test_recovery_codes_sign_in_once_each(mesh: Mesh) -> None:
    email, registered, secret, codes = await with_mfa(mesh)
    assert len(codes) == 10
    assert len(set(codes)) == 10
    assert all(len(c) == 19 and c.count("-") == 3 for c in codes)
    # Stored only as digests.
    async with mesh.runtime.db.transaction() as session:
        stored = [
            row.code_hash
            for row in await session.execute(
                text("SELECT code_hash FROM auth_mfa_recovery_codes WHERE user_id = :u"),
                {"u": registered.user.id},
            )
        ]
    assert len(stored) == 10
    for code in codes:
        assert code not in str(stored)
        assert code.replace("-", "") not in str(stored)

    signed_in = await login(mesh, email, recovery_code=codes[0])
    assert signed_in.user.id == registered.user.id
    # Typed in lower case without dashes: the same code.
    assert (await login(mesh, email, recovery_code=codes[1].replace("-", "").lower())).user.id
    # Spent: refused like a wrong password.
    with pytest.raises(aio.AioRpcError) as err:
        await login(mesh, email, recovery_code=codes[0])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(err.value) == "INVALID_CREDENTIALS"
    # Someone else's code, or a made-up one, does not work either.
    with pytest.raises(aio.AioRpcError) as err:
        await login(mesh, email, recovery_code="AAAA-BBBB-CCCC-DDDD")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Both kinds of code at once, or a malformed one: the field is named.
    with pytest.raises(aio.AioRpcError) as err:
        await login(mesh, email, mfa_code="123456", recovery_code=codes[2])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(err.value)) == {"recovery_code"}
    with pytest.raises(aio.AioRpcError) as err:
        await login(mesh, email, recovery_code="0000-not-a-code")
    assert set(violations(err.value)) == {"recovery_code"}

    # Two concurrent sign-ins with one code: one wins.
    results = await asyncio.gather(
        login(mesh, email, recovery_code=codes[3]),
        login(mesh, email, recovery_code=codes[3]),
        return_exceptions=True,
    )
    assert sum(isinstance(r, auth_pb2.LoginResponse) for r in results) == 1

    events = await audit_events(mesh, registered.user.id)
    used = [d["codes_left"] for e, d in events if e == "mfa.recovery_code_used"]
    assert used == [9, 8, 7]
    vias = [d.get("via") for e, d in events if e == "login.succeeded"]
    assert vias == ["recovery_code"] * 3
    assert not any(code in str(events) for code in codes)

    # A recovery code also turns MFA off (with the password); code and recovery_code are
    # one or the other.
    me = bearer(signed_in.access_token)
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.DisableMfa(auth_pb2.DisableMfaRequest(password=PASSWORD), metadata=me)
    assert set(violations(err.value)) == {"code", "recovery_code"}
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.DisableMfa(
            auth_pb2.DisableMfaRequest(password=PASSWORD, recovery_code=codes[0]), metadata=me
        )
    assert violations(err.value) == {
        "recovery_code": "the recovery code is wrong or was already used"
    }
    await mesh.auth.DisableMfa(
        auth_pb2.DisableMfaRequest(password=PASSWORD, recovery_code=codes[4]), metadata=me
    )
    assert (await login(mesh, email)).user.id == registered.user.id
    async with mesh.runtime.db.transaction() as session:
        left = await session.scalar(
            text("SELECT count(*) FROM auth_mfa_recovery_codes WHERE user_id = :u"),
            {"u": registered.user.id},
        )
    assert left == 0
    del secret


async def test_admin_resets_a_users_mfa(mesh: Mesh, admin: auth_pb2.RegisterResponse) -> None:
    email, registered, _, _ = await with_mfa(mesh)
    request = auth_pb2.ResetMfaRequest(user_id=registered.user.id)

    # Only admins: the owner's own token (or anyone else's) is refused.
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.ResetMfa(request, metadata=bearer(registered.access_token))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.ResetMfa(request)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    done = await mesh.auth.ResetMfa(request, metadata=bearer(admin.access_token))
    assert done.had_mfa
    assert done.revoked_sessions == 1
    # The sessions from before (a thief's among them) are over; the password alone signs in.
    assert not (await introspect(mesh, registered.access_token)).active
    assert (await login(mesh, email)).user.id == registered.user.id
    again = await mesh.auth.ResetMfa(request, metadata=bearer(admin.access_token))
    assert not again.had_mfa

    events = await audit_events(mesh, registered.user.id)
    resets = [d for e, d in events if e == "mfa.reset"]
    assert resets[0] == {"had_mfa": True, "sessions_revoked": 1, "via": "rpc"}
    async with mesh.runtime.db.transaction() as session:
        actors = list(
            await session.scalars(
                text("SELECT actor FROM auth_audit WHERE subject = :u AND event = 'mfa.reset'"),
                {"u": registered.user.id},
            )
        )
    assert actors == [admin.user.id, admin.user.id]

    for user_id, code in (
        ("00000000-0000-4000-8000-000000000000", grpc.StatusCode.NOT_FOUND),
        ("not-a-uuid", grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(aio.AioRpcError) as err:
            await mesh.auth.ResetMfa(
                auth_pb2.ResetMfaRequest(user_id=user_id), metadata=bearer(admin.access_token)
            )
        assert err.value.code() == code


async def run_cli(mesh: Mesh, *args: str) -> Finished:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEARNMESH_")}
    env.update(
        LEARNMESH_VAR_DIR=mesh.settings.var_dir, LEARNMESH_DATABASE_URL=mesh.settings.database
    )
    return await run_to_end(python_module("learnmesh.cli", *args), env=env)


async def test_operator_resets_mfa_from_the_command_line(mesh: Mesh) -> None:
    email, registered, _, _ = await with_mfa(mesh)
    code, out, err = await run_cli(mesh, "users", "reset-mfa", email.upper())
    assert code == 0, err
    assert f"({registered.user.id}): MFA was on and is now off; 1 session(s) ended" in out
    assert (await login(mesh, email)).user.id == registered.user.id
    assert not (await introspect(mesh, registered.access_token)).active
    async with mesh.runtime.db.transaction() as session:
        row = (
            await session.execute(
                text(
                    "SELECT actor, details FROM auth_audit "
                    "WHERE subject = :u AND event = 'mfa.reset'"
                ),
                {"u": registered.user.id},
            )
        ).one()
    assert row.actor.startswith("operator:")
    assert '"via": "cli"' in row.details

    code, out, err = await run_cli(mesh, "users", "reset-mfa", "nobody-at-all@example.com")
    assert code == 1
    assert "no account has the email nobody-at-all@example.com" in err
    assert "Traceback" not in err
