"""The auth service end to end over real channels: register, login, profile, refresh and
reuse detection, logout, sessions, throttling, bad input, internal methods, the audit trail."""

from __future__ import annotations

import asyncio
import socket
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc import aio
from sqlalchemy import text

from learnmesh import config
from learnmesh.auth.v1 import auth_pb2
from learnmesh.user.v1 import user_pb2
from services.auth import store
from tests.conftest import (
    ADMIN_EMAIL,
    PASSWORD,
    Mesh,
    bearer,
    mesh_settings,
    running_mesh,
    scratch_database,
)
from tests.support.mesh import audit_events, count_rows, introspect, new_email
from tests.support.status import error_reason, retry_delay, violations


@pytest.fixture(scope="module")
async def admin(mesh: Mesh) -> auth_pb2.RegisterResponse:
    """The module's one admin account."""
    return await mesh.register(ADMIN_EMAIL, name="The Admin")


async def login(mesh: Mesh, email: str, password: str = PASSWORD) -> auth_pb2.LoginResponse:
    response: auth_pb2.LoginResponse = await mesh.auth.Login(
        auth_pb2.LoginRequest(email=email, password=password)
    )
    return response


async def test_register_login_profile_refresh_reuse_logout(mesh: Mesh) -> None:
    email = new_email("Flow").replace("flow", "FLOW")
    registered = await mesh.register(email, name="Flow User")
    assert registered.user.email == email.lower()
    assert registered.user.display_name == "Flow User"
    assert registered.token_type == "Bearer"
    assert registered.expires_in == 900
    assert registered.access_token.count(".") == 2
    assert len(registered.refresh_token) >= 40
    user_id = registered.user.id
    uuid.UUID(user_id)

    # Emails are case-insensitive.
    signed_in = await login(mesh, email.upper())
    assert signed_in.user.id == user_id
    assert signed_in.token_type == "Bearer"
    assert signed_in.refresh_token != registered.refresh_token

    me = await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=bearer(signed_in.access_token))
    assert me.user.id == user_id
    assert me.user.email == email.lower()

    updated = await mesh.user.UpdateMe(
        user_pb2.UpdateMeRequest(
            profile=user_pb2.ProfileUpdate(display_name="Renamed User"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=bearer(signed_in.access_token),
    )
    assert updated.user.display_name == "Renamed User"

    refreshed = await mesh.auth.Refresh(
        auth_pb2.RefreshRequest(refresh_token=signed_in.refresh_token)
    )
    assert refreshed.token_type == "Bearer"
    assert refreshed.expires_in == 900
    assert refreshed.refresh_token not in (signed_in.refresh_token, registered.refresh_token)
    me = await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=bearer(refreshed.access_token))
    assert me.user.display_name == "Renamed User"

    # The spent refresh token presented again: refused, and the whole family is revoked...
    with pytest.raises(aio.AioRpcError) as reuse:
        await mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token=signed_in.refresh_token))
    assert reuse.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(reuse.value) == "REFRESH_TOKEN_REUSED"
    # ...so the token the good Refresh issued is refused too,
    with pytest.raises(aio.AioRpcError) as after:
        await mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token=refreshed.refresh_token))
    assert after.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # and the session's access tokens no longer introspect as active.
    inactive = await introspect(mesh, refreshed.access_token)
    assert not inactive.active

    # The registration's own session was not touched; Logout ends it.
    still = await introspect(mesh, registered.access_token)
    assert still.active
    out = await mesh.auth.Logout(auth_pb2.LogoutRequest(), metadata=bearer(registered.access_token))
    assert out.revoked_sessions == 1
    with pytest.raises(aio.AioRpcError) as ended:
        await mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token=registered.refresh_token))
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(ended.value) == "SESSION_ENDED"
    # The ended session's access token is refused from then on (every server hears it).
    reason = ""
    for _ in range(100):
        try:
            await mesh.auth.Logout(
                auth_pb2.LogoutRequest(), metadata=bearer(registered.access_token)
            )
        except aio.AioRpcError as exc:
            reason = error_reason(exc)
            break
        await asyncio.sleep(0.02)
    assert reason == "SESSION_REVOKED"

    events = await audit_events(mesh, user_id)
    names = [event for event, _ in events]
    assert names.count("login.succeeded") == 1
    assert "refresh_token.reused" in names
    reasons = sorted(d["reason"] for e, d in events if e == "session.revoked")
    assert reasons == ["logout", "refresh_token_reuse"]


async def test_unknown_refresh_token_is_refused(mesh: Mesh) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token="x" * 43))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(err.value) == "INVALID_REFRESH_TOKEN"


async def test_register_twice_is_already_exists(mesh: Mesh) -> None:
    email = new_email("twice")
    await mesh.register(email)
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.register(email.upper(), password="another long password")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert err.value.details() == "an account with this email already exists"
    # The first password still works, the second never became one.
    await login(mesh, email)
    with pytest.raises(aio.AioRpcError) as wrong:
        await login(mesh, email, "another long password")
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_pending_registration_is_taken_over(mesh: Mesh) -> None:
    """A pending row left by a crash: the next Register of the email finishes it."""
    email = new_email("crashed")
    user_id = str(uuid.uuid4())
    async with mesh.runtime.db.transaction() as session:
        await store.add_pending_credentials(session, user_id, email, "$argon2id$left-by-crash")
    with pytest.raises(aio.AioRpcError) as pending:
        await login(mesh, email)  # a pending account cannot sign in
    assert pending.value.code() == grpc.StatusCode.UNAUTHENTICATED

    registered = await mesh.register(email, name="Second Try")
    assert registered.user.id == user_id
    assert (await login(mesh, email)).user.id == user_id


async def test_wrong_password_and_unknown_email_look_alike(mesh: Mesh) -> None:
    email = new_email("wrongpw")
    registered = await mesh.register(email)
    unknown = new_email("nobody")
    errors = []
    for who, password in ((email, "not the password at all"), (unknown, PASSWORD)):
        with pytest.raises(aio.AioRpcError) as err:
            await login(mesh, who, password)
        errors.append(err.value)
    assert [e.code() for e in errors] == [grpc.StatusCode.UNAUTHENTICATED] * 2
    assert {e.details() for e in errors} == {"email or password is incorrect"}
    assert {error_reason(e) for e in errors} == {"INVALID_CREDENTIALS"}

    # Both failures were recorded although the calls failed.
    events = await audit_events(mesh, registered.user.id)
    assert ("login.failed", {"email": email, "reason": "password"}) in events
    anonymous = await audit_events(mesh, "")
    assert ("login.failed", {"email": unknown, "reason": "unknown_email"}) in anonymous
    async with mesh.runtime.db.transaction() as session:
        attempts = await session.scalar(
            text("SELECT count(*) FROM auth_login_attempts WHERE email IN (:a, :b)"),
            {"a": email, "b": unknown},
        )
    assert attempts == 2


async def test_sessions_listed_and_revoked(mesh: Mesh) -> None:
    email = new_email("sessions")
    registered = await mesh.register(email)
    first = await login(mesh, email)
    second = await login(mesh, email)
    listed = await mesh.auth.ListSessions(
        auth_pb2.ListSessionsRequest(), metadata=bearer(second.access_token)
    )
    assert len(listed.sessions) == 3
    created = [s.created_at.ToDatetime() for s in listed.sessions]
    assert created == sorted(created, reverse=True)
    current = [s for s in listed.sessions if s.current]
    assert len(current) == 1
    assert current[0].id == listed.sessions[0].id
    assert all(s.client_address == "127.0.0.1" for s in listed.sessions)
    assert all(s.expires_at.ToDatetime() > s.created_at.ToDatetime() for s in listed.sessions)

    # The first login's session is the second newest.
    first_session = listed.sessions[1].id
    await mesh.auth.RevokeSession(
        auth_pb2.RevokeSessionRequest(session_id=first_session),
        metadata=bearer(second.access_token),
    )
    with pytest.raises(aio.AioRpcError) as gone:
        await mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token=first.refresh_token))
    assert gone.value.code() == grpc.StatusCode.UNAUTHENTICATED
    listed = await mesh.auth.ListSessions(
        auth_pb2.ListSessionsRequest(), metadata=bearer(second.access_token)
    )
    assert first_session not in {s.id for s in listed.sessions}
    assert len(listed.sessions) == 2

    # Another user can neither revoke nor log out these sessions.
    other = await mesh.register(new_email("other"))
    for session_id in (listed.sessions[0].id, str(uuid.uuid4())):
        with pytest.raises(aio.AioRpcError) as err:
            await mesh.auth.RevokeSession(
                auth_pb2.RevokeSessionRequest(session_id=session_id),
                metadata=bearer(other.access_token),
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.Logout(
            auth_pb2.LogoutRequest(refresh_token=second.refresh_token),
            metadata=bearer(other.access_token),
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert (
        await mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token=second.refresh_token))
    ).access_token

    # Logout by refresh token ends that session; all_sessions ends the rest.
    logged_out = await mesh.auth.Logout(
        auth_pb2.LogoutRequest(refresh_token=registered.refresh_token),
        metadata=bearer(second.access_token),
    )
    assert logged_out.revoked_sessions == 1
    everything = await mesh.auth.Logout(
        auth_pb2.LogoutRequest(all_sessions=True), metadata=bearer(second.access_token)
    )
    assert everything.revoked_sessions == 1
    # This token's own session ended too: refused once the revocation reached the link,
    # and before that it lists nothing (which of the two depends on the event's speed).
    answer: auth_pb2.ListSessionsResponse | str
    try:
        answer = await mesh.auth.ListSessions(
            auth_pb2.ListSessionsRequest(), metadata=bearer(second.access_token)
        )
    except aio.AioRpcError as refused:
        answer = error_reason(refused)
    assert answer == "SESSION_REVOKED" or (
        isinstance(answer, auth_pb2.ListSessionsResponse) and not answer.sessions
    )
    # The other user's session was left alone.
    mine = await mesh.auth.ListSessions(
        auth_pb2.ListSessionsRequest(), metadata=bearer(other.access_token)
    )
    assert len(mine.sessions) == 1


async def test_user_methods_need_a_token(mesh: Mesh) -> None:
    calls: tuple[tuple[Any, Any], ...] = (
        (mesh.auth.ListSessions, auth_pb2.ListSessionsRequest()),
        (mesh.auth.Logout, auth_pb2.LogoutRequest()),
        (mesh.auth.EnrollMfa, auth_pb2.EnrollMfaRequest()),
    )
    for call, request in calls:
        with pytest.raises(aio.AioRpcError) as err:
            await call(request)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_bad_register_input_names_each_field_and_writes_nothing(mesh: Mesh) -> None:
    before = await count_rows(mesh, "auth_credentials")
    bad = {
        "email": auth_pb2.RegisterRequest(
            email="not-an-email", password=PASSWORD, display_name="Bad", accepted_terms=True
        ),
        "password": auth_pb2.RegisterRequest(
            email=new_email("short"), password="x" * 11, display_name="Bad", accepted_terms=True
        ),
        "accepted_terms": auth_pb2.RegisterRequest(
            email=new_email("terms"), password=PASSWORD, display_name="Bad", accepted_terms=False
        ),
    }
    for field, request in bad.items():
        with pytest.raises(aio.AioRpcError) as err:
            await mesh.auth.Register(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(violations(err.value)) == {field}
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.Register(
            auth_pb2.RegisterRequest(email="nope", password="short", accepted_terms=False)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(err.value)) == {
        "email",
        "password",
        "display_name",
        "accepted_terms",
    }
    assert await count_rows(mesh, "auth_credentials") == before


async def test_internal_methods_refuse_end_user_tokens(
    mesh: Mesh, admin: auth_pb2.RegisterResponse
) -> None:
    """Even from an allowed mesh service, a call carrying an end-user token is refused."""
    token = bearer(admin.access_token)
    request = auth_pb2.IntrospectTokenRequest(token=admin.access_token)
    assert (await mesh.auth_as("user").IntrospectToken(request)).active  # control
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth_as("user").IntrospectToken(request, metadata=token)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not end users" in (err.value.details() or "")
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.user_as("auth").CreateUser(
            user_pb2.CreateUserRequest(
                user_id=str(uuid.uuid4()), email=new_email("sneaky"), display_name="Sneaky"
            ),
            metadata=token,
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not end users" in (err.value.details() or "")
    # And end users' own channel (not a mesh service) is refused outright.
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.IntrospectToken(request, metadata=token)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_admin_role_reaches_the_token(mesh: Mesh, admin: auth_pb2.RegisterResponse) -> None:
    found = await introspect(mesh, admin.access_token)
    assert found.active
    assert list(found.roles) == ["admin"]
    assert found.subject == admin.user.id


async def test_audit_trail_is_append_only(mesh: Mesh) -> None:
    registered = await mesh.register(new_email("audited"))
    await mesh.auth.Logout(auth_pb2.LogoutRequest(), metadata=bearer(registered.access_token))
    async with mesh.runtime.db.transaction() as session:
        row = (
            await session.execute(
                text(
                    "SELECT client_address, request_id, at FROM auth_audit "
                    "WHERE subject = :s AND event = 'session.revoked'"
                ),
                {"s": registered.user.id},
            )
        ).one()
    assert row.client_address == "127.0.0.1"
    assert row.request_id
    assert row.at is not None
    before = await count_rows(mesh, "auth_audit")
    for statement in (
        "UPDATE auth_audit SET event = 'tampered'",
        "DELETE FROM auth_audit",
    ):
        with pytest.raises(Exception, match="append-only"):
            async with mesh.runtime.db.transaction() as session:
                await session.execute(text(statement))
    assert await count_rows(mesh, "auth_audit") == before
    async with mesh.runtime.db.transaction() as session:
        tampered = await session.scalar(
            text("SELECT count(*) FROM auth_audit WHERE event = 'tampered'")
        )
    assert tampered == 0


async def test_login_throttled_per_email(tmp_path: Path) -> None:
    async with (
        scratch_database("sqlite", tmp_path) as url,
        running_mesh(mesh_settings(tmp_path, url, throttle_per_email=3)) as mesh,
    ):
        email = new_email("throttled")
        await mesh.register(email)
        for _ in range(3):
            with pytest.raises(aio.AioRpcError) as err:
                await login(mesh, email, "wrong password!")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Locked now, even with the right password (so it cannot be probed).
        with pytest.raises(aio.AioRpcError) as err:
            await login(mesh, email)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(err.value) == "LOGIN_THROTTLED"
        delay = retry_delay(err.value)
        assert 800 < delay <= 900
        # Other accounts are not affected.
        other = new_email("free")
        await mesh.register(other)
        assert (await login(mesh, other)).access_token


async def test_login_throttled_per_address(tmp_path: Path) -> None:
    async with scratch_database("sqlite", tmp_path) as url:
        settings = mesh_settings(tmp_path, url)
        settings = replace(settings, auth=replace(settings.auth, throttle_per_address=4))
        async with running_mesh(settings) as mesh:
            victim = new_email("victim")
            await mesh.register(victim)
            # Spraying one guess each over many emails from one address.
            for _ in range(4):
                with pytest.raises(aio.AioRpcError) as err:
                    await login(mesh, new_email("spray"), "guess guess guess")
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(aio.AioRpcError) as err:
                await login(mesh, victim)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert retry_delay(err.value) > 800


async def test_concurrent_refreshes_with_one_token_let_one_win(mesh: Mesh) -> None:
    """Two refreshes racing with the same token: one wins, the other counts as reuse and
    ends the family, so the winner's new token is refused afterwards too."""
    registered = await mesh.register(new_email("race"))
    request = auth_pb2.RefreshRequest(refresh_token=registered.refresh_token)
    results = await asyncio.gather(
        mesh.auth.Refresh(request), mesh.auth.Refresh(request), return_exceptions=True
    )
    won = [r for r in results if isinstance(r, auth_pb2.RefreshResponse)]
    lost = [r for r in results if isinstance(r, aio.AioRpcError)]
    assert len(won) == 1
    assert len(lost) == 1
    assert lost[0].code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token=won[0].refresh_token))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_deleted_profile_cannot_sign_in_or_refresh(mesh: Mesh) -> None:
    email = new_email("leaving")
    registered = await mesh.register(email)
    await mesh.user.DeleteUser(
        user_pb2.DeleteUserRequest(user_id=registered.user.id),
        metadata=bearer(registered.access_token),
    )
    with pytest.raises(aio.AioRpcError) as err:
        await login(mesh, email)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Before auth has consumed user.deleted the profile lookup refuses (ACCOUNT_DELETED);
    # after, the credentials are gone and the email looks unknown (INVALID_CREDENTIALS).
    assert error_reason(err.value) in {"ACCOUNT_DELETED", "INVALID_CREDENTIALS"}
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token=registered.refresh_token))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not (await introspect(mesh, registered.access_token)).active


async def test_email_taken_in_the_user_service_leaves_no_credentials(mesh: Mesh) -> None:
    """CreateUser answers ALREADY_EXISTS: the pending credentials are removed again."""
    email = new_email("taken")
    await mesh.user_as("auth").CreateUser(
        user_pb2.CreateUserRequest(user_id=str(uuid.uuid4()), email=email, display_name="Elsewhere")
    )
    before = await count_rows(mesh, "auth_credentials")
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.register(email)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert err.value.details() == "an account with this email already exists"
    assert await count_rows(mesh, "auth_credentials") == before


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_user_service_down_then_register_again_finishes(tmp_path: Path) -> None:
    """UNAVAILABLE while the user service is down; the pending registration is kept (the
    profile may or may not exist) and the next Register of the email completes it with the
    same user id."""
    email = new_email("retry")
    async with scratch_database("sqlite", tmp_path) as url:
        settings = mesh_settings(tmp_path, url)
        lonely = replace(settings, user_address=f"127.0.0.1:{closed_port()}")
        async with running_mesh(lonely, services=("auth",)) as mesh:
            with pytest.raises(aio.AioRpcError) as err:
                await mesh.register(email)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            async with mesh.runtime.db.transaction() as session:
                pending = (
                    await session.execute(
                        text("SELECT user_id, status FROM auth_credentials WHERE email = :e"),
                        {"e": email},
                    )
                ).one()
            assert pending.status == "pending"
        async with running_mesh(settings) as mesh:
            with pytest.raises(aio.AioRpcError) as err:
                await login(mesh, email)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            registered = await mesh.register(email, password="the second password")
            assert registered.user.id == pending.user_id
            assert (await login(mesh, email, "the second password")).user.id == pending.user_id


async def test_login_rehashes_when_the_parameters_change(tmp_path: Path) -> None:
    email = new_email("rehash")
    async with scratch_database("sqlite", tmp_path) as url:
        async with running_mesh(mesh_settings(tmp_path, url)) as mesh:
            await mesh.register(email)
        stronger = mesh_settings(tmp_path, url, argon2_time_cost=3)
        async with running_mesh(stronger) as mesh:
            query = text("SELECT password_hash FROM auth_credentials WHERE email = :e")
            async with mesh.runtime.db.transaction() as session:
                assert ",t=2," in str(await session.scalar(query, {"e": email}))
            await login(mesh, email)
            async with mesh.runtime.db.transaction() as session:
                assert ",t=3," in str(await session.scalar(query, {"e": email}))
            assert (await login(mesh, email)).access_token


async def test_login_flood_from_one_address_is_rate_limited(tmp_path: Path) -> None:
    """The reference document's per-address login limit (5 a minute), on the product chain."""
    settings = mesh_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    settings = replace(settings, limits=config.load(env={}).limits)
    async with running_mesh(settings) as flooded:
        request = auth_pb2.LoginRequest(email="nobody@example.com", password="wrong password")
        codes = []
        for _ in range(7):
            try:
                await flooded.auth.Login(request)
            except aio.AioRpcError as exc:
                codes.append(exc.code())
                last = exc
        assert codes[:5] == [grpc.StatusCode.UNAUTHENTICATED] * 5
        assert codes[5:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        delay = retry_delay(last)
        assert 0 < delay <= 60
        trailers = dict(last.trailing_metadata())
        assert trailers["x-ratelimit-limit"] == "5" and trailers["x-ratelimit-remaining"] == "0"
