"""UserService through the real mesh (auth + user on an ephemeral port), SQLite and PostgreSQL.

Every call goes over a real channel through the server chain, so access policy and
validation are part of what is tested.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from learnmesh.auth.v1 import auth_pb2
from learnmesh.common.v1 import common_pb2
from learnmesh.user.v1 import user_pb2
from tests.conftest import ADMIN_EMAIL, PASSWORD, Mesh, bearer
from tests.support.mesh import audit_rows, new_email
from tests.support.status import error_reason, refused, violations

IN_APP = common_pb2.NOTIFICATION_CHANNEL_IN_APP
EMAIL = common_pb2.NOTIFICATION_CHANNEL_EMAIL
WEBHOOK = common_pb2.NOTIFICATION_CHANNEL_WEBHOOK


# --- helpers -------------------------------------------------------------------------------


async def exists(mesh: Mesh, user_id: str) -> bool:
    found = await mesh.user_as("auth").BatchGetUsers(
        user_pb2.BatchGetUsersRequest(user_ids=[user_id])
    )
    return [u.id for u in found.users] == [user_id]


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def admin(mesh: Mesh) -> auth_pb2.RegisterResponse:
    """The module's admin: registered, then promoted as an operator does (Mesh.make_admin)."""
    return await mesh.register(email=ADMIN_EMAIL, name="The Admin")


@pytest.fixture
async def alice(mesh: Mesh) -> auth_pb2.RegisterResponse:
    return await mesh.register(email=new_email("alice"), name="Alice Example")


@pytest.fixture
async def bob(mesh: Mesh) -> auth_pb2.RegisterResponse:
    return await mesh.register(email=new_email("bob"), name="Bob Example")


# --- profiles ------------------------------------------------------------------------------


async def test_register_creates_profile_with_defaults_and_get_me_returns_it(
    mesh: Mesh, alice: auth_pb2.RegisterResponse
) -> None:
    me = (await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=bearer(alice.access_token))).user
    assert me.id == alice.user.id
    assert me.email.startswith("alice-")
    assert me.display_name == "Alice Example"
    assert me.role == user_pb2.ROLE_FREE_USER
    assert me.tier == user_pb2.SUBSCRIPTION_TIER_FREE
    assert me.preferences.theme == user_pb2.THEME_SYSTEM
    assert me.preferences.language == "en"
    assert list(me.preferences.notification_channels) == [IN_APP, EMAIL]
    assert me.created_at.seconds > 0
    assert me.updated_at == me.created_at


async def test_the_admin_fixture_is_promoted_by_the_operator_path(
    mesh: Mesh, admin: auth_pb2.RegisterResponse
) -> None:
    assert admin.user.role == user_pb2.ROLE_ADMIN
    rows = await audit_rows(mesh, admin.user.id, "role.changed")
    assert [(r.actor, json.loads(r.details)) for r in rows] == [
        ("operator", {"new": "admin", "old": "free_user", "via": "cli"})
    ]


async def test_get_me_without_token_is_unauthenticated(mesh: Mesh) -> None:
    await refused(mesh.user.GetMe(user_pb2.GetMeRequest()), grpc.StatusCode.UNAUTHENTICATED)


async def test_get_user_by_owner_and_admin_only(
    mesh: Mesh,
    admin: auth_pb2.RegisterResponse,
    alice: auth_pb2.RegisterResponse,
    bob: auth_pb2.RegisterResponse,
) -> None:
    request = user_pb2.GetUserRequest(user_id=alice.user.id)
    own = await mesh.user.GetUser(request, metadata=bearer(alice.access_token))
    assert own.user.id == alice.user.id
    by_admin = await mesh.user.GetUser(request, metadata=bearer(admin.access_token))
    assert by_admin.user.email == own.user.email

    err = await refused(
        mesh.user.GetUser(request, metadata=bearer(bob.access_token)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert "owner" in (err.details() or "")
    await refused(mesh.user.GetUser(request), grpc.StatusCode.UNAUTHENTICATED)

    missing = user_pb2.GetUserRequest(user_id=str(uuid.uuid4()))
    await refused(
        mesh.user.GetUser(missing, metadata=bearer(admin.access_token)),
        grpc.StatusCode.NOT_FOUND,
    )


# --- UpdateMe ------------------------------------------------------------------------------


def update(paths: list[str], **profile: Any) -> user_pb2.UpdateMeRequest:
    return user_pb2.UpdateMeRequest(
        profile=user_pb2.ProfileUpdate(**profile),
        update_mask=field_mask_pb2.FieldMask(paths=paths),
    )


async def test_update_me_changes_only_masked_fields(
    mesh: Mesh, alice: auth_pb2.RegisterResponse
) -> None:
    auth = bearer(alice.access_token)
    before = (await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=auth)).user

    changed = (
        await mesh.user.UpdateMe(
            update(
                ["bio"],
                display_name="Not Masked",
                bio="I teach calculus.",
                preferences=user_pb2.Preferences(theme=user_pb2.THEME_DARK, language="fr"),
            ),
            metadata=auth,
        )
    ).user
    assert changed.bio == "I teach calculus."
    assert changed.display_name == before.display_name
    assert changed.preferences == before.preferences
    assert changed.updated_at.ToDatetime() > before.updated_at.ToDatetime()
    assert changed.created_at == before.created_at

    changed = (
        await mesh.user.UpdateMe(
            update(
                ["preferences.theme", "display_name"],
                display_name="Alice Renamed",
                bio="",
                preferences=user_pb2.Preferences(theme=user_pb2.THEME_DARK, language="fr"),
            ),
            metadata=auth,
        )
    ).user
    assert changed.display_name == "Alice Renamed"
    assert changed.bio == "I teach calculus."  # not masked this time
    assert changed.preferences.theme == user_pb2.THEME_DARK
    assert changed.preferences.language == "en"  # only the theme was masked
    assert list(changed.preferences.notification_channels) == [IN_APP, EMAIL]

    changed = (
        await mesh.user.UpdateMe(
            update(
                ["preferences.notification_channels"],
                preferences=user_pb2.Preferences(notification_channels=[WEBHOOK]),
            ),
            metadata=auth,
        )
    ).user
    assert list(changed.preferences.notification_channels) == [WEBHOOK]
    assert changed.preferences.theme == user_pb2.THEME_DARK

    whole = user_pb2.Preferences(theme=user_pb2.THEME_LIGHT, language="de")
    changed = (
        await mesh.user.UpdateMe(update(["preferences"], preferences=whole), metadata=auth)
    ).user
    assert changed.preferences == whole  # replaced whole: the channels are now empty

    stored = (await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=auth)).user
    assert stored == changed


@pytest.mark.parametrize("path", ["email", "role", "avatar_url", "preferences.colour"])
async def test_update_me_refuses_paths_outside_the_allowed_set(
    mesh: Mesh, alice: auth_pb2.RegisterResponse, path: str
) -> None:
    auth = bearer(alice.access_token)
    before = (await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=auth)).user
    err = await refused(
        mesh.user.UpdateMe(update(["bio", path], bio="sneaky"), metadata=auth),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert list(violations(err)) == ["update_mask"]
    assert repr(path) in violations(err)["update_mask"]
    assert (await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=auth)).user == before


async def test_update_me_refuses_an_empty_mask(
    mesh: Mesh, alice: auth_pb2.RegisterResponse
) -> None:
    auth = bearer(alice.access_token)
    err = await refused(
        mesh.user.UpdateMe(update([], bio="x"), metadata=auth), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert list(violations(err)) == ["update_mask"]
    # No mask at all is refused by the proto's rule, naming the same field.
    err = await refused(
        mesh.user.UpdateMe(
            user_pb2.UpdateMeRequest(profile=user_pb2.ProfileUpdate(bio="x")), metadata=auth
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "update_mask" in violations(err)


@pytest.mark.parametrize("name", ["A", ""])
async def test_update_me_refuses_a_bad_display_name_and_changes_nothing(
    mesh: Mesh, alice: auth_pb2.RegisterResponse, name: str
) -> None:
    auth = bearer(alice.access_token)
    before = (await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=auth)).user
    err = await refused(
        mesh.user.UpdateMe(
            update(["display_name", "bio"], display_name=name, bio="changed"), metadata=auth
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert list(violations(err)) == ["profile.display_name"]
    assert (await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=auth)).user == before


async def test_update_me_refuses_unset_theme_when_masked(
    mesh: Mesh, alice: auth_pb2.RegisterResponse
) -> None:
    auth = bearer(alice.access_token)
    err = await refused(
        mesh.user.UpdateMe(
            update(["preferences.theme"], preferences=user_pb2.Preferences()), metadata=auth
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert list(violations(err)) == ["profile.preferences.theme"]


# --- ListUsers -----------------------------------------------------------------------------


async def list_all(
    mesh: Mesh, token: str, *, page_size: int, **filters: Any
) -> tuple[list[user_pb2.User], int]:
    """Every page of a listing: (users in order, number of pages)."""
    users: list[user_pb2.User] = []
    page_token, pages = "", 0
    while True:
        page = await mesh.user.ListUsers(
            user_pb2.ListUsersRequest(page_size=page_size, page_token=page_token, **filters),
            metadata=bearer(token),
        )
        users.extend(page.users)
        pages += 1
        if not page.next_page_token:
            return users, pages
        page_token = page.next_page_token
        assert pages < 100, "the listing does not end"


async def test_list_users_pages_newest_first_without_duplicates_or_gaps(
    mesh: Mesh, admin: auth_pb2.RegisterResponse
) -> None:
    marker = uuid.uuid4().hex[:8]
    made = [(await mesh.register(name=f"Pager {marker} {i}")).user for i in range(7)]

    users, pages = await list_all(mesh, admin.access_token, page_size=3, query=marker)
    assert pages == 3
    assert [u.id for u in users] == [u.id for u in reversed(made)]  # newest first

    # A page boundary stays put when rows are inserted meanwhile (keyset, not OFFSET).
    first = await mesh.user.ListUsers(
        user_pb2.ListUsersRequest(page_size=3, query=marker), metadata=bearer(admin.access_token)
    )
    newcomer = (await mesh.register(name=f"Pager {marker} late")).user
    rest = await mesh.user.ListUsers(
        user_pb2.ListUsersRequest(page_size=10, query=marker, page_token=first.next_page_token),
        metadata=bearer(admin.access_token),
    )
    seen = [u.id for u in first.users] + [u.id for u in rest.users]
    assert seen == [u.id for u in reversed(made)]
    assert newcomer.id not in seen
    assert rest.next_page_token == ""

    # The whole listing holds every profile once; without page_size a page holds 20.
    all_users, _ = await list_all(mesh, admin.access_token, page_size=5)
    ids = [u.id for u in all_users]
    assert len(ids) == len(set(ids))
    assert {u.id for u in made} | {newcomer.id, admin.user.id} <= set(ids)
    default = await mesh.user.ListUsers(
        user_pb2.ListUsersRequest(), metadata=bearer(admin.access_token)
    )
    assert [u.id for u in default.users] == ids[:20]
    assert bool(default.next_page_token) == (len(ids) > 20)
    stamps = [(u.created_at.ToDatetime(), u.id) for u in all_users]
    assert stamps == sorted(stamps, reverse=True)


async def test_list_users_filters_by_role_and_query_with_wildcards_taken_literally(
    mesh: Mesh, admin: auth_pb2.RegisterResponse
) -> None:
    marker = uuid.uuid4().hex[:8]
    percent = (await mesh.register(name=f"{marker} 100% done")).user
    plain = (await mesh.register(name=f"{marker} 1000 done")).user
    underscore = (await mesh.register(name=f"{marker} a_b")).user
    other = (await mesh.register(name=f"{marker} axb")).user

    async def matching(query: str, **filters: Any) -> set[str]:
        found, _ = await list_all(mesh, admin.access_token, page_size=50, query=query, **filters)
        return {u.id for u in found}

    assert await matching(f"{marker} 100%") == {percent.id}
    assert await matching(f"{marker} A_B") == {underscore.id}  # case-insensitive, "_" literal
    assert await matching(marker) == {percent.id, plain.id, underscore.id, other.id}
    # The email matches too (case-insensitively).
    assert await matching(percent.email.upper()) == {percent.id}

    assert await matching(marker, role=user_pb2.ROLE_FREE_USER) == {
        percent.id,
        plain.id,
        underscore.id,
        other.id,
    }
    assert await matching(marker, role=user_pb2.ROLE_INSTRUCTOR) == set()
    admins = await matching("", role=user_pb2.ROLE_ADMIN)
    assert admin.user.id in admins


async def test_list_users_is_for_admins_only(mesh: Mesh, alice: auth_pb2.RegisterResponse) -> None:
    err = await refused(
        mesh.user.ListUsers(user_pb2.ListUsersRequest(), metadata=bearer(alice.access_token)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert "admin" in (err.details() or "")
    await refused(mesh.user.ListUsers(user_pb2.ListUsersRequest()), grpc.StatusCode.UNAUTHENTICATED)


async def test_list_users_refuses_bad_arguments(
    mesh: Mesh, admin: auth_pb2.RegisterResponse
) -> None:
    auth = bearer(admin.access_token)
    err = await refused(
        mesh.user.ListUsers(user_pb2.ListUsersRequest(page_size=0), metadata=auth),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert list(violations(err)) == ["page_size"]
    err = await refused(
        mesh.user.ListUsers(user_pb2.ListUsersRequest(page_size=101), metadata=auth),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert list(violations(err)) == ["page_size"]
    err = await refused(
        mesh.user.ListUsers(user_pb2.ListUsersRequest(role=42), metadata=auth),  # type: ignore[arg-type]
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert list(violations(err)) == ["role"]


async def test_list_users_refuses_tampered_or_foreign_page_tokens(
    mesh: Mesh, admin: auth_pb2.RegisterResponse
) -> None:
    auth = bearer(admin.access_token)
    marker = uuid.uuid4().hex[:8]
    for i in range(3):
        await mesh.register(name=f"Token {marker} {i}")
    first = await mesh.user.ListUsers(
        user_pb2.ListUsersRequest(page_size=1, query=marker), metadata=auth
    )
    token = first.next_page_token
    assert token

    # Well formed, naming a real position, but not signed with the service's key.
    position = base64.urlsafe_b64decode(token.split(".")[0] + "==")
    unsigned = base64.urlsafe_b64encode(position).decode().rstrip("=") + "."
    made_up = unsigned + base64.urlsafe_b64encode(hashlib.sha256(position).digest()[:16]).decode()
    tampered = [
        made_up.rstrip("="),
        unsigned,
        token[:-2] + ("AA" if token[-2:] != "AA" else "BB"),
        "not-a-token",
        "!!!",
        token[::-1],
    ]
    for bad in tampered:
        err = await refused(
            mesh.user.ListUsers(
                user_pb2.ListUsersRequest(page_size=1, query=marker, page_token=bad),
                metadata=auth,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert list(violations(err)) == ["page_token"], bad

    # The same token with other filters.
    for filters in ({"query": marker + "x"}, {"query": marker, "role": user_pb2.ROLE_ADMIN}):
        err = await refused(
            mesh.user.ListUsers(
                user_pb2.ListUsersRequest(page_size=1, page_token=token, **filters),
                metadata=auth,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert list(violations(err)) == ["page_token"]

    # The untouched token still works.
    second = await mesh.user.ListUsers(
        user_pb2.ListUsersRequest(page_size=1, query=marker, page_token=token), metadata=auth
    )
    assert len(second.users) == 1
    assert second.users[0].id != first.users[0].id


# --- SetRole -------------------------------------------------------------------------------


async def test_set_role_by_admin_is_audited(
    mesh: Mesh, admin: auth_pb2.RegisterResponse, alice: auth_pb2.RegisterResponse
) -> None:
    response = await mesh.user.SetRole(
        user_pb2.SetRoleRequest(user_id=alice.user.id, role=user_pb2.ROLE_INSTRUCTOR),
        metadata=bearer(admin.access_token),
    )
    assert response.user.role == user_pb2.ROLE_INSTRUCTOR
    # Her older tokens are refused once the role change reaches the auth link: sign in.
    again = await mesh.auth.Login(auth_pb2.LoginRequest(email=alice.user.email, password=PASSWORD))
    me = (await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=bearer(again.access_token))).user
    assert me.role == user_pb2.ROLE_INSTRUCTOR

    rows = await audit_rows(mesh, alice.user.id, "role.changed")
    assert len(rows) == 1
    event, subject, actor, client_address, request_id, details = rows[0]
    assert (event, subject, actor) == ("role.changed", alice.user.id, admin.user.id)
    assert json.loads(details) == {"old": "free_user", "new": "instructor"}
    assert client_address == "127.0.0.1"
    assert request_id

    # Setting the same role again changes and records nothing.
    await mesh.user.SetRole(
        user_pb2.SetRoleRequest(user_id=alice.user.id, role=user_pb2.ROLE_INSTRUCTOR),
        metadata=bearer(admin.access_token),
    )
    assert len(await audit_rows(mesh, alice.user.id, "role.changed")) == 1


async def test_set_role_is_for_admins_only_and_needs_a_known_user(
    mesh: Mesh,
    admin: auth_pb2.RegisterResponse,
    alice: auth_pb2.RegisterResponse,
    bob: auth_pb2.RegisterResponse,
) -> None:
    request = user_pb2.SetRoleRequest(user_id=bob.user.id, role=user_pb2.ROLE_ADMIN)
    await refused(
        mesh.user.SetRole(request, metadata=bearer(alice.access_token)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    # Not even for oneself.
    await refused(
        mesh.user.SetRole(request, metadata=bearer(bob.access_token)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await refused(mesh.user.SetRole(request), grpc.StatusCode.UNAUTHENTICATED)
    me = (await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=bearer(bob.access_token))).user
    assert me.role == user_pb2.ROLE_FREE_USER
    assert await audit_rows(mesh, bob.user.id, "role.changed") == []

    await refused(
        mesh.user.SetRole(
            user_pb2.SetRoleRequest(user_id=str(uuid.uuid4()), role=user_pb2.ROLE_MODERATOR),
            metadata=bearer(admin.access_token),
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    err = await refused(
        mesh.user.SetRole(
            user_pb2.SetRoleRequest(user_id=bob.user.id, role=user_pb2.ROLE_UNSPECIFIED),
            metadata=bearer(admin.access_token),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert list(violations(err)) == ["role"]


async def test_the_last_admin_keeps_the_admin_role(
    mesh: Mesh, admin: auth_pb2.RegisterResponse, bob: auth_pb2.RegisterResponse
) -> None:
    auth = bearer(admin.access_token)
    demote_self = user_pb2.SetRoleRequest(user_id=admin.user.id, role=user_pb2.ROLE_FREE_USER)

    # With a second admin, that one can be demoted again...
    await mesh.user.SetRole(
        user_pb2.SetRoleRequest(user_id=bob.user.id, role=user_pb2.ROLE_ADMIN), metadata=auth
    )
    await mesh.user.SetRole(
        user_pb2.SetRoleRequest(user_id=bob.user.id, role=user_pb2.ROLE_SUBSCRIBER), metadata=auth
    )
    # ...as every other admin left over by earlier tests, until only this one remains.
    others, _ = await list_all(mesh, admin.access_token, page_size=100, role=user_pb2.ROLE_ADMIN)
    for other in others:
        if other.id != admin.user.id:
            await mesh.user.SetRole(
                user_pb2.SetRoleRequest(user_id=other.id, role=user_pb2.ROLE_FREE_USER),
                metadata=auth,
            )

    err = await refused(
        mesh.user.SetRole(demote_self, metadata=auth), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert "last admin" in (err.details() or "")
    assert error_reason(err) == "LAST_ADMIN"
    err = await refused(
        mesh.user.DeleteUser(user_pb2.DeleteUserRequest(user_id=admin.user.id), metadata=auth),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "last admin" in (err.details() or "")
    me = (await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=auth)).user
    assert me.role == user_pb2.ROLE_ADMIN
    rows = await audit_rows(mesh, admin.user.id)
    # The operator's promotion only: the refused changes left no trace.
    assert [(r.event, r.actor) for r in rows if r.event != "user.created"] == [
        ("role.changed", "operator")
    ]


# --- DeleteUser ----------------------------------------------------------------------------


async def test_delete_user_by_owner(mesh: Mesh, alice: auth_pb2.RegisterResponse) -> None:
    auth = bearer(alice.access_token)
    await mesh.user.DeleteUser(user_pb2.DeleteUserRequest(user_id=alice.user.id), metadata=auth)
    assert not await exists(mesh, alice.user.id)
    # The deleted user's token: NOT_FOUND until the deletion reaches the auth link, then
    # refused there (UNAUTHENTICATED, SESSION_REVOKED).
    gone = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED)
    for call in (
        mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=auth),
        mesh.user.DeleteUser(user_pb2.DeleteUserRequest(user_id=alice.user.id), metadata=auth),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() in gone
    rows = await audit_rows(mesh, alice.user.id, "user.deleted")
    assert [(r.actor, json.loads(r.details)) for r in rows] == [
        (alice.user.id, {"self_service": True})
    ]


async def test_delete_user_by_admin(
    mesh: Mesh, admin: auth_pb2.RegisterResponse, bob: auth_pb2.RegisterResponse
) -> None:
    request = user_pb2.DeleteUserRequest(user_id=bob.user.id)
    await mesh.user.DeleteUser(request, metadata=bearer(admin.access_token))
    assert not await exists(mesh, bob.user.id)
    await refused(
        mesh.user.DeleteUser(request, metadata=bearer(admin.access_token)),
        grpc.StatusCode.NOT_FOUND,
    )
    rows = await audit_rows(mesh, bob.user.id, "user.deleted")
    assert [r.actor for r in rows] == [admin.user.id]


async def test_delete_user_by_another_user_is_refused_and_keeps_the_row(
    mesh: Mesh, alice: auth_pb2.RegisterResponse, bob: auth_pb2.RegisterResponse
) -> None:
    request = user_pb2.DeleteUserRequest(user_id=alice.user.id)
    await refused(
        mesh.user.DeleteUser(request, metadata=bearer(bob.access_token)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await refused(mesh.user.DeleteUser(request), grpc.StatusCode.UNAUTHENTICATED)
    assert await exists(mesh, alice.user.id)
    assert await audit_rows(mesh, alice.user.id, "user.deleted") == []


# --- SetAvatar -----------------------------------------------------------------------------


async def test_set_avatar_without_a_file_service_is_unavailable(
    mesh: Mesh, alice: auth_pb2.RegisterResponse
) -> None:
    auth = bearer(alice.access_token)
    err = await refused(
        mesh.user.SetAvatar(user_pb2.SetAvatarRequest(file_id=str(uuid.uuid4())), metadata=auth),
        grpc.StatusCode.UNAVAILABLE,
    )
    assert err.details() == "the file service is not reachable"
    me = (await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=auth)).user
    assert me.avatar_url == ""
    err = await refused(
        mesh.user.SetAvatar(user_pb2.SetAvatarRequest(file_id="not-a-uuid"), metadata=auth),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert list(violations(err)) == ["file_id"]


# --- internal methods ----------------------------------------------------------------------


async def test_create_user_is_idempotent_and_emails_are_unique(mesh: Mesh) -> None:
    user_id, email = str(uuid.uuid4()), new_email("Mixed.Case")
    request = user_pb2.CreateUserRequest(user_id=user_id, email=email, display_name="First")
    created = (await mesh.user_as("auth").CreateUser(request)).user
    assert created.email == email.lower()

    # A retry (even with the email in other case, or another name) returns it unchanged.
    retried = (
        await mesh.user_as("auth").CreateUser(
            user_pb2.CreateUserRequest(user_id=user_id, email=email.upper(), display_name="Second")
        )
    ).user
    assert retried == created

    # The email (in any case) under another id.
    err = await refused(
        mesh.user_as("auth").CreateUser(
            user_pb2.CreateUserRequest(
                user_id=str(uuid.uuid4()), email=email.upper(), display_name="Thief"
            )
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert "email" in (err.details() or "")
    # The id with another email.
    await refused(
        mesh.user_as("auth").CreateUser(
            user_pb2.CreateUserRequest(user_id=user_id, email=new_email(), display_name="Other")
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert len(await audit_rows(mesh, user_id, "user.created")) == 1


async def test_create_user_refuses_end_user_tokens_and_writes_nothing(
    mesh: Mesh, alice: auth_pb2.RegisterResponse
) -> None:
    user_id = str(uuid.uuid4())
    request = user_pb2.CreateUserRequest(user_id=user_id, email=new_email(), display_name="Eve")
    await refused(
        mesh.user_as("auth").CreateUser(request, metadata=bearer(alice.access_token)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert not await exists(mesh, user_id)
    assert await audit_rows(mesh, user_id) == []
    await refused(
        mesh.user_as("auth").BatchGetUsers(
            user_pb2.BatchGetUsersRequest(user_ids=[alice.user.id]),
            metadata=bearer(alice.access_token),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )


async def test_create_user_refuses_bad_input(mesh: Mesh) -> None:
    err = await refused(
        mesh.user_as("auth").CreateUser(
            user_pb2.CreateUserRequest(
                user_id=str(uuid.uuid4()), email="not an email", display_name="Eve"
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert list(violations(err)) == ["email"]


async def test_batch_get_users_keeps_order_and_skips_unknown_ids(
    mesh: Mesh, alice: auth_pb2.RegisterResponse, bob: auth_pb2.RegisterResponse
) -> None:
    unknown = str(uuid.uuid4())
    ids = [bob.user.id, unknown, alice.user.id, bob.user.id]
    found = await mesh.user_as("auth").BatchGetUsers(user_pb2.BatchGetUsersRequest(user_ids=ids))
    assert [u.id for u in found.users] == [bob.user.id, alice.user.id]
    assert found.users[0].email == bob.user.email

    err = await refused(
        mesh.user_as("auth").BatchGetUsers(user_pb2.BatchGetUsersRequest(user_ids=[])),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert list(violations(err)) == ["user_ids"]


# --- the audit table -----------------------------------------------------------------------


async def test_audit_table_refuses_update_and_delete(
    mesh: Mesh, admin: auth_pb2.RegisterResponse, bob: auth_pb2.RegisterResponse
) -> None:
    await mesh.user.SetRole(
        user_pb2.SetRoleRequest(user_id=bob.user.id, role=user_pb2.ROLE_MODERATOR),
        metadata=bearer(admin.access_token),
    )
    before = await audit_rows(mesh, bob.user.id)
    assert [r.event for r in before] == ["user.created", "role.changed"]

    engine = mesh.runtime.db.engine
    for statement in (
        "UPDATE user_audit SET event = 'forged' WHERE subject = :subject",
        "DELETE FROM user_audit WHERE subject = :subject",
    ):
        with pytest.raises(DBAPIError, match="append-only"):
            async with engine.begin() as conn:
                await conn.execute(text(statement), {"subject": bob.user.id})
    assert await audit_rows(mesh, bob.user.id) == before
