"""The events the auth and user services emit, read from their outboxes after real calls
over mTLS: each in the transaction of its change (a refused change leaves none), with the
fields its consumers need."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import field_mask_pb2

from learnmesh import cli
from learnmesh.auth.v1 import auth_pb2
from learnmesh.events.v1 import events_pb2
from learnmesh.kernel.tokens import LEEWAY
from learnmesh.user.v1 import user_pb2
from tests.conftest import ADMIN_EMAIL, PASSWORD, Mesh, bearer
from tests.support.mesh import (
    audit_events,
    data_of,
    introspect,
    new_email,
    outbox_events,
    reset_token_in,
    wait_for_mail,
    wait_until,
)
from tests.support.status import refused
from tests.support.totp import code_at, start_of_a_quiet_step


@pytest.fixture(scope="module")
async def admin(mesh: Mesh) -> auth_pb2.RegisterResponse:
    return await mesh.register(ADMIN_EMAIL)


def types(events: list[events_pb2.Event]) -> list[str]:
    return [e.type for e in events]


def revocations(events: list[events_pb2.Event]) -> list[events_pb2.SessionRevoked]:
    return [data_of(e, events_pb2.SessionRevoked) for e in events if e.type == "session.revoked"]


def assert_expires_with_the_last_token(mesh: Mesh, revoked: events_pb2.SessionRevoked) -> None:
    """expires_at: the last access token's exp (issued just now) plus the verifiers' leeway."""
    ttl = mesh.settings.auth.access_token_ttl
    expires_at = revoked.expires_at.ToDatetime(tzinfo=UTC)
    now = datetime.now(UTC)
    assert now + timedelta(seconds=ttl + LEEWAY - 30) < expires_at
    assert expires_at <= now + timedelta(seconds=ttl + LEEWAY + 2)


async def test_register_emits_user_created_and_login_user_login(mesh: Mesh) -> None:
    email = new_email("created")
    registered = await mesh.register(email, name="Ada Lovelace")
    user_id = registered.user.id
    (created,) = await outbox_events(mesh, "user", user_id)
    assert (created.type, created.source, created.subject) == ("user.created", "user", user_id)
    assert data_of(created, events_pb2.UserCreated) == events_pb2.UserCreated(
        user_id=user_id, email=email, display_name="Ada Lovelace"
    )
    assert await outbox_events(mesh, "auth", user_id) == []  # registering is no sign-in

    await refused(
        mesh.auth.Login(auth_pb2.LoginRequest(email=email, password="wrong password")),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert await outbox_events(mesh, "auth", user_id) == []
    login = await mesh.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
    session_id = (await introspect(mesh, login.access_token)).session_id
    (signed_in,) = await outbox_events(mesh, "auth", user_id)
    assert signed_in.type == "user.login"
    assert data_of(signed_in, events_pb2.UserLogin) == events_pb2.UserLogin(
        user_id=user_id, session_id=session_id, client_address="127.0.0.1"
    )


async def test_user_updated_names_the_fields_that_changed(mesh: Mesh) -> None:
    registered = await mesh.register(new_email("updated"), name="Before")
    user_id, auth = registered.user.id, bearer(registered.access_token)

    async def update(paths: list[str], **profile: str) -> None:
        await mesh.user.UpdateMe(
            user_pb2.UpdateMeRequest(
                profile=user_pb2.ProfileUpdate(**profile),  # type: ignore[arg-type]
                update_mask=field_mask_pb2.FieldMask(paths=paths),
            ),
            metadata=auth,
        )

    await update(["display_name", "bio"], display_name="After", bio="")  # bio stays ""
    await update(["display_name"], display_name="After")  # nothing changes: no event
    await refused(  # refused before the transaction: no event either
        mesh.user.UpdateMe(
            user_pb2.UpdateMeRequest(update_mask=field_mask_pb2.FieldMask(paths=["email"])),
            metadata=auth,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    events = await outbox_events(mesh, "user", user_id)
    assert types(events) == ["user.created", "user.updated"]
    assert list(data_of(events[1], events_pb2.UserUpdated).changed_fields) == ["display_name"]


async def test_role_changes_emit_user_updated_and_a_refused_one_nothing(
    mesh: Mesh, admin: auth_pb2.RegisterResponse
) -> None:
    email = new_email("role")
    user_id = (await mesh.register(email)).user.id
    as_admin = bearer(admin.access_token)
    request = user_pb2.SetRoleRequest(user_id=user_id, role=user_pb2.ROLE_INSTRUCTOR)
    await mesh.user.SetRole(request, metadata=as_admin)
    await mesh.user.SetRole(request, metadata=as_admin)  # already so: nothing changed
    await mesh.promote(email, "moderator")  # `learnmesh users promote`
    events = await outbox_events(mesh, "user", user_id)
    assert types(events) == ["user.created", "user.updated", "user.updated"]
    assert [list(data_of(e, events_pb2.UserUpdated).changed_fields) for e in events[1:]] == [
        ["role"],
        ["role"],
    ]

    # The last admin demoting themselves rolls back: the event with it.
    admins = await mesh.user.ListUsers(
        user_pb2.ListUsersRequest(role=user_pb2.ROLE_ADMIN), metadata=as_admin
    )
    if [u.id for u in admins.users] == [admin.user.id]:
        before = await outbox_events(mesh, "user", admin.user.id)
        demote = user_pb2.SetRoleRequest(user_id=admin.user.id, role=user_pb2.ROLE_FREE_USER)
        await refused(
            mesh.user.SetRole(demote, metadata=as_admin), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert await outbox_events(mesh, "user", admin.user.id) == before


async def test_delete_user_emits_user_deleted(mesh: Mesh) -> None:
    registered = await mesh.register(new_email("deleted"))
    user_id = registered.user.id
    await mesh.user.DeleteUser(
        user_pb2.DeleteUserRequest(user_id=user_id), metadata=bearer(registered.access_token)
    )
    events = await outbox_events(mesh, "user", user_id)
    assert types(events) == ["user.created", "user.deleted"]
    assert data_of(events[1], events_pb2.UserDeleted).user_id == user_id


async def test_every_early_end_of_sessions_emits_session_revoked(
    mesh: Mesh, admin: auth_pb2.RegisterResponse
) -> None:
    email = new_email("revoked")
    registered = await mesh.register(email)
    user_id = registered.user.id

    async def session_of(token: str) -> str:
        return (await introspect(mesh, token)).session_id

    # Logout of the calling session.
    ended = await session_of(registered.access_token)
    await mesh.auth.Logout(auth_pb2.LogoutRequest(), metadata=bearer(registered.access_token))
    (logout,) = revocations(await outbox_events(mesh, "auth", user_id))
    assert (list(logout.session_ids), logout.all_sessions, logout.reason) == (
        [ended],
        False,
        "logout",
    )
    assert_expires_with_the_last_token(mesh, logout)

    # RevokeSession of another one.
    first = await mesh.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
    second = await mesh.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
    target = await session_of(second.access_token)
    await mesh.auth.RevokeSession(
        auth_pb2.RevokeSessionRequest(session_id=target), metadata=bearer(first.access_token)
    )
    revoked = revocations(await outbox_events(mesh, "auth", user_id))[-1]
    assert (list(revoked.session_ids), revoked.reason) == ([target], "revoked_by_user")

    # A refresh token presented twice ends its family.
    refreshed = await mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token=first.refresh_token))
    family = await session_of(refreshed.access_token)
    await refused(
        mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token=first.refresh_token)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    reused = revocations(await outbox_events(mesh, "auth", user_id))[-1]
    assert (list(reused.session_ids), reused.reason) == ([family], "refresh_token_reuse")
    assert_expires_with_the_last_token(mesh, reused)

    # Ending a session already ended emits nothing new.
    count = len(revocations(await outbox_events(mesh, "auth", user_id)))
    fresh = await mesh.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
    await mesh.auth.Logout(
        auth_pb2.LogoutRequest(refresh_token=first.refresh_token),
        metadata=bearer(fresh.access_token),
    )
    assert len(revocations(await outbox_events(mesh, "auth", user_id))) == count

    # Logout everywhere, a password reset, an admin's and the operator's MFA reset end all.
    for end in ("logout_all", "password_reset", "mfa_reset", "operator"):
        live = await mesh.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
        if end == "logout_all":
            await mesh.auth.Logout(
                auth_pb2.LogoutRequest(all_sessions=True), metadata=bearer(live.access_token)
            )
        elif end == "password_reset":
            mails = len(await wait_for_mail(mesh.mail_dir, email, 0))
            await mesh.auth.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(email=email))
            token = reset_token_in((await wait_for_mail(mesh.mail_dir, email, mails + 1))[-1])
            await mesh.auth.ResetPassword(
                auth_pb2.ResetPasswordRequest(token=token, new_password=PASSWORD)
            )
        elif end == "mfa_reset":
            await mesh.auth.ResetMfa(
                auth_pb2.ResetMfaRequest(user_id=user_id), metadata=bearer(admin.access_token)
            )
        else:
            with redirect_stdout(io.StringIO()):
                assert await cli._reset_mfa(mesh.settings, email) == 0
        last = revocations(await outbox_events(mesh, "auth", user_id))[-1]
        reason = "mfa_reset" if end == "operator" else end
        assert (list(last.session_ids), last.all_sessions, last.reason) == ([], True, reason)
        assert_expires_with_the_last_token(mesh, last)


async def test_password_reset_requested_only_for_an_existing_account(mesh: Mesh) -> None:
    email = new_email("reset")
    user_id = (await mesh.register(email)).user.id
    unknown = new_email("nobody")
    await mesh.auth.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(email=unknown))
    await mesh.auth.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(email=email))
    await wait_for_mail(mesh.mail_dir, email)

    async def unknown_handled() -> bool:
        return any(d.get("email") == unknown for _, d in await audit_events(mesh, ""))

    await wait_until(unknown_handled)  # the unknown email's background work is done too
    (requested,) = [
        e
        for e in await outbox_events(mesh, "auth", user_id)
        if e.type == "password.reset_requested"
    ]
    assert data_of(requested, events_pb2.PasswordResetRequested) == (
        events_pb2.PasswordResetRequested(user_id=user_id, email=email)
    )
    assert await outbox_events(mesh, "auth", "") == []  # nothing about the unknown one


async def test_confirming_mfa_emits_mfa_enabled(mesh: Mesh) -> None:
    registered = await mesh.register(new_email("mfa"))
    user_id, me = registered.user.id, bearer(registered.access_token)
    enrolment = await mesh.auth.EnrollMfa(auth_pb2.EnrollMfaRequest(password=PASSWORD), metadata=me)
    step = await start_of_a_quiet_step()
    await refused(
        mesh.auth.ConfirmMfa(
            auth_pb2.ConfirmMfaRequest(code=code_at(enrolment.secret, step - 3), password=PASSWORD),
            metadata=me,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert await outbox_events(mesh, "auth", user_id) == []  # a wrong code enables nothing
    await mesh.auth.ConfirmMfa(
        auth_pb2.ConfirmMfaRequest(code=code_at(enrolment.secret, step), password=PASSWORD),
        metadata=me,
    )
    (enabled,) = await outbox_events(mesh, "auth", user_id)
    assert enabled.type == "mfa.enabled"
    assert data_of(enabled, events_pb2.MfaEnabled).user_id == user_id
