"""Subscription tiers, set by an admin (UserService.SetTier) or an operator (`learnmesh users
set-tier EMAIL TIER`), over the real mesh on SQLite and PostgreSQL.

A change is one transaction: the tier, a ``user.updated`` event naming ``tier`` and a
``tier.changed`` audit row; the same tier again writes nothing. The auth service reads the
profile at every sign-in and refresh, so the next access token carries the new tier.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from learnmesh import cli
from learnmesh.auth.v1 import auth_pb2
from learnmesh.events.v1 import events_pb2
from learnmesh.user.v1 import user_pb2
from services.user.profiles import TIERS
from tests.conftest import ADMIN_EMAIL, PASSWORD, Mesh, bearer
from tests.support.mesh import audit_rows, data_of, introspect, new_email, outbox_events
from tests.support.processes import Finished, run_to_end
from tests.support.status import refused, violations

LEARNMESH = [sys.executable, "-m", "learnmesh.cli"]
PRO = user_pb2.SUBSCRIPTION_TIER_PRO


@pytest.fixture(scope="module")
async def admin(mesh: Mesh) -> auth_pb2.RegisterResponse:
    """Registered, then promoted as an operator does (Mesh.make_admin)."""
    return await mesh.register(ADMIN_EMAIL)


@pytest.fixture
async def member(mesh: Mesh) -> auth_pb2.RegisterResponse:
    return await mesh.register(new_email("member"))


def claims(token: str) -> dict[str, Any]:
    """The access token's claims, read without verifying it (the mesh verified it)."""
    found: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return found


async def set_tier(
    mesh: Mesh, token: str, user_id: str, tier: user_pb2.SubscriptionTier.ValueType
) -> user_pb2.User:
    response = await mesh.user.SetTier(
        user_pb2.SetTierRequest(user_id=user_id, tier=tier), metadata=bearer(token)
    )
    user: user_pb2.User = response.user
    return user


def tier_updates(events: list[events_pb2.Event]) -> list[list[str]]:
    """changed_fields of the ``user.updated`` events that name the tier."""
    updates = [data_of(e, events_pb2.UserUpdated) for e in events if e.type == "user.updated"]
    return [list(u.changed_fields) for u in updates if "tier" in u.changed_fields]


async def run_command(mesh: Mesh, *args: str) -> Finished:
    """`learnmesh ARGS…` as a process of its own, on the mesh's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEARNMESH_")}
    env.update(
        LEARNMESH_DATABASE_URL=mesh.settings.database, LEARNMESH_VAR_DIR=mesh.settings.var_dir
    )
    return await run_to_end([*LEARNMESH, *args], env=env)


def test_the_rules_know_the_tiers_of_the_contract() -> None:
    contract = [
        n.removeprefix("SUBSCRIPTION_TIER_").lower() for n in user_pb2.SubscriptionTier.keys()[1:]
    ]
    assert list(TIERS) == contract


# --- SetTier -------------------------------------------------------------------------------


async def test_an_admin_sets_a_tier_event_and_audit_row_with_it(
    mesh: Mesh, admin: auth_pb2.RegisterResponse, member: auth_pb2.RegisterResponse
) -> None:
    user_id = member.user.id
    before = (
        await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=bearer(member.access_token))
    ).user
    assert before.tier == user_pb2.SUBSCRIPTION_TIER_FREE

    user = await set_tier(mesh, admin.access_token, user_id, PRO)
    assert (user.id, user.tier, user.role) == (user_id, PRO, user_pb2.ROLE_FREE_USER)
    assert user.updated_at.ToDatetime() > before.updated_at.ToDatetime()
    assert user.created_at == before.created_at
    got = await mesh.user.GetUser(
        user_pb2.GetUserRequest(user_id=user_id), metadata=bearer(admin.access_token)
    )
    assert got.user.tier == PRO

    assert tier_updates(await outbox_events(mesh, "user", user_id)) == [["tier"]]
    rows = await audit_rows(mesh, user_id, "tier.changed")
    assert len(rows) == 1
    event, subject, actor, client_address, request_id, details = rows[0]
    assert (event, subject, actor) == ("tier.changed", user_id, admin.user.id)
    assert json.loads(details) == {"old": "free", "new": "pro"}
    assert client_address == "127.0.0.1"
    assert request_id

    # The same tier again: answered with the profile, nothing written.
    again = await set_tier(mesh, admin.access_token, user_id, PRO)
    assert again.tier == PRO and again.updated_at == user.updated_at
    assert tier_updates(await outbox_events(mesh, "user", user_id)) == [["tier"]]
    assert len(await audit_rows(mesh, user_id, "tier.changed")) == 1

    # Another tier: a second event and row.
    await set_tier(mesh, admin.access_token, user_id, user_pb2.SUBSCRIPTION_TIER_ENTERPRISE)
    assert tier_updates(await outbox_events(mesh, "user", user_id)) == [["tier"], ["tier"]]
    rows = await audit_rows(mesh, user_id, "tier.changed")
    assert [json.loads(r.details) for r in rows] == [
        {"old": "free", "new": "pro"},
        {"old": "pro", "new": "enterprise"},
    ]


async def test_set_tier_is_for_admins_only(mesh: Mesh, member: auth_pb2.RegisterResponse) -> None:
    other = await mesh.register(new_email("other"))
    for target in (other.user.id, member.user.id):  # not even one's own tier
        request = user_pb2.SetTierRequest(user_id=target, tier=PRO)
        await refused(
            mesh.user.SetTier(request, metadata=bearer(member.access_token)),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    await refused(
        mesh.user.SetTier(user_pb2.SetTierRequest(user_id=member.user.id, tier=PRO)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    me = (await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=bearer(member.access_token))).user
    assert me.tier == user_pb2.SUBSCRIPTION_TIER_FREE
    for user_id in (member.user.id, other.user.id):
        assert await audit_rows(mesh, user_id, "tier.changed") == []
        assert tier_updates(await outbox_events(mesh, "user", user_id)) == []


async def test_set_tier_names_the_bad_field_and_needs_a_known_user(
    mesh: Mesh, admin: auth_pb2.RegisterResponse, member: auth_pb2.RegisterResponse
) -> None:
    auth = bearer(admin.access_token)
    cases: list[tuple[user_pb2.SetTierRequest, list[str]]] = [
        (user_pb2.SetTierRequest(user_id="not-a-uuid", tier=PRO), ["user_id"]),
        (user_pb2.SetTierRequest(user_id="", tier=PRO), ["user_id"]),
        (
            user_pb2.SetTierRequest(
                user_id=member.user.id, tier=user_pb2.SUBSCRIPTION_TIER_UNSPECIFIED
            ),
            ["tier"],
        ),
        # A number the enum lacks, as an older or hostile client may send.
        (user_pb2.SetTierRequest(user_id=member.user.id, tier=99), ["tier"]),  # type: ignore[arg-type]
        (user_pb2.SetTierRequest(user_id="nope"), ["user_id", "tier"]),
    ]
    for request, fields in cases:
        err = await refused(
            mesh.user.SetTier(request, metadata=auth), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert sorted(violations(err)) == sorted(fields), request

    await refused(
        mesh.user.SetTier(
            user_pb2.SetTierRequest(user_id=str(uuid.uuid4()), tier=PRO), metadata=auth
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert await audit_rows(mesh, member.user.id, "tier.changed") == []


# --- the tier in the next access token -----------------------------------------------------


async def test_the_next_refresh_and_sign_in_carry_the_new_tier(
    mesh: Mesh, admin: auth_pb2.RegisterResponse, member: auth_pb2.RegisterResponse
) -> None:
    assert claims(member.access_token)["tier"] == "free"
    await set_tier(mesh, admin.access_token, member.user.id, user_pb2.SUBSCRIPTION_TIER_BASIC)

    refreshed = await mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token=member.refresh_token))
    assert claims(refreshed.access_token)["tier"] == "basic"
    assert (await introspect(mesh, refreshed.access_token)).tier == "basic"
    # A tier change revokes nothing: the token issued before still works, with its old tier.
    found = await introspect(mesh, member.access_token)
    assert found.active and found.tier == "free"
    await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=bearer(member.access_token))

    await set_tier(mesh, admin.access_token, member.user.id, PRO)
    again = await mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token=refreshed.refresh_token))
    assert claims(again.access_token)["tier"] == "pro"
    login = await mesh.auth.Login(auth_pb2.LoginRequest(email=member.user.email, password=PASSWORD))
    assert claims(login.access_token)["tier"] == "pro"
    assert login.user.tier == PRO


# --- learnmesh users set-tier --------------------------------------------------------------


async def test_set_tier_as_an_operator_runs_it(mesh: Mesh) -> None:
    """A real process on the mesh's database: the tier, the event, the audit row, the next
    token."""
    registered = await mesh.register(new_email("Upgraded"))
    email, user_id = registered.user.email, registered.user.id
    code, out, err = await run_command(mesh, "users", "set-tier", email.upper(), "enterprise")
    assert code == 0, err
    assert email in out and "free -> enterprise" in out and "operator" in out
    assert "Traceback" not in err

    refreshed = await mesh.auth.Refresh(
        auth_pb2.RefreshRequest(refresh_token=registered.refresh_token)
    )
    assert claims(refreshed.access_token)["tier"] == "enterprise"
    me = await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=bearer(refreshed.access_token))
    assert me.user.tier == user_pb2.SUBSCRIPTION_TIER_ENTERPRISE

    rows = await audit_rows(mesh, user_id, "tier.changed")
    assert [(r.actor, json.loads(r.details)) for r in rows] == [
        ("operator", {"new": "enterprise", "old": "free", "via": "cli"})
    ]
    assert tier_updates(await outbox_events(mesh, "user", user_id)) == [["tier"]]

    # Again: nothing to change, nothing recorded.
    code, out, _ = await run_command(mesh, "users", "set-tier", email, "enterprise")
    assert code == 0 and "already has the tier enterprise" in out
    assert len(await audit_rows(mesh, user_id, "tier.changed")) == 1
    assert tier_updates(await outbox_events(mesh, "user", user_id)) == [["tier"]]


async def test_set_tier_gives_any_tier_of_the_contract(mesh: Mesh, tmp_path: Path) -> None:
    registered = await mesh.register(new_email("tiers"))
    path = tmp_path / "learnmesh.toml"
    path.write_text(
        f"var_dir = {json.dumps(mesh.settings.var_dir)}\n"
        f"database_url = {json.dumps(mesh.settings.database)}\n"
    )
    refresh_token = registered.refresh_token
    for tier in ("basic", "pro", "enterprise", "free"):
        args = ["--config", str(path), "users", "set-tier", registered.user.email, tier]
        assert await _main(*args) == 0
        refreshed = await mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token=refresh_token))
        refresh_token = refreshed.refresh_token
        assert claims(refreshed.access_token)["tier"] == tier
    assert len(await audit_rows(mesh, registered.user.id, "tier.changed")) == 4


async def test_set_tier_refuses_an_unknown_email_or_tier(mesh: Mesh, tmp_path: Path) -> None:
    email = new_email("nobody")
    code, out, err = await run_command(mesh, "users", "set-tier", email, "pro")
    assert code == 1
    assert f"no user with email {email}" in err
    assert "Traceback" not in err and out == ""

    code, _, err = await run_command(mesh, "users", "set-tier", email, "platinum")
    assert code == 2  # argparse, naming the choices
    assert "free" in err and "enterprise" in err


async def test_set_tier_without_the_user_tables_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text(f'var_dir = "{tmp_path}"\ndatabase_url = "sqlite:///{tmp_path / "empty.db"}"\n')
    command = ["--config", str(path), "users", "set-tier", "a@b.example", "pro"]
    code, _, err = await run_to_end([*LEARNMESH, *command])
    assert code == 1
    assert "cannot change the tier" in err and "learnmesh migrate user" in err
    assert "Traceback" not in err and "SELECT" not in err


async def _main(*argv: str) -> int:
    """The CLI's main, with its own event loop in a thread (as a terminal would run it)."""
    return await asyncio.to_thread(cli.main, list(argv))
