"""Where admins come from and how the last one stays, on SQLite and PostgreSQL.

* No address becomes admin by registering (LEARNMESH_USER_ADMIN_EMAILS is gone, and start-up
  refuses it); an operator runs `learnmesh users promote EMAIL --role ROLE` where the
  database is, audited with actor "operator", and the user's next token carries the role.
* Two admins demoting (or deleting) each other at once: exactly one succeeds, an admin
  remains. Before, both succeeded on SQLite, where FOR UPDATE locks nothing.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from grpc import aio

from learnmesh import cli, config
from learnmesh.auth.v1 import auth_pb2
from learnmesh.user.v1 import user_pb2
from services.user.profiles import ROLES
from tests.conftest import PASSWORD, Mesh, bearer
from tests.support.mesh import audit_rows, introspect, new_email
from tests.support.processes import Finished, run_to_end
from tests.support.status import error_reason

LEARNMESH = [sys.executable, "-m", "learnmesh.cli"]
ROUNDS = 5


def command_env(mesh: Mesh) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("LEARNMESH_")}
    env.update(
        LEARNMESH_DATABASE_URL=mesh.settings.database, LEARNMESH_VAR_DIR=mesh.settings.var_dir
    )
    return env


async def run_command(mesh: Mesh, *args: str) -> Finished:
    return await run_to_end([*LEARNMESH, *args], env=command_env(mesh))


def config_file(mesh: Mesh, tmp_path: Path) -> str:
    path = tmp_path / "learnmesh.toml"
    path.write_text(
        f"var_dir = {json.dumps(mesh.settings.var_dir)}\n"
        f"database_url = {json.dumps(mesh.settings.database)}\n"
    )
    return str(path)


async def main(*argv: str) -> int:
    """The CLI's main, with its own event loop in a thread (as a terminal would run it)."""
    return await asyncio.to_thread(cli.main, list(argv))


async def login(mesh: Mesh, email: str) -> auth_pb2.LoginResponse:
    response: auth_pb2.LoginResponse = await mesh.auth.Login(
        auth_pb2.LoginRequest(email=email, password=PASSWORD)
    )
    return response


async def admins_of(mesh: Mesh) -> list[str]:
    from sqlalchemy import text

    async with mesh.runtime.db.engine.connect() as conn:
        rows = await conn.execute(text("SELECT id FROM user_profiles WHERE role = 'admin'"))
        return sorted(r[0] for r in rows)


async def only_admins(mesh: Mesh, count: int) -> list[auth_pb2.LoginResponse]:
    """Makes ``count`` new admins the only admins of the mesh; their fresh sign-ins."""
    made = []
    for _ in range(count):
        registered = await mesh.register(new_email("adm"))
        await mesh.promote(registered.user.email, "admin")
        made.append(await login(mesh, registered.user.email))
    keep = {m.user.id for m in made}
    for other in await admins_of(mesh):
        if other not in keep:
            await mesh.user.SetRole(
                user_pb2.SetRoleRequest(user_id=other, role=user_pb2.ROLE_FREE_USER),
                metadata=bearer(made[0].access_token),
            )
    assert await admins_of(mesh) == sorted(keep)
    return made


# --- no admin by address -------------------------------------------------------------------


def test_the_admin_emails_setting_is_refused_naming_its_replacement(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.load(env={"LEARNMESH_USER_ADMIN_EMAILS": "boss@example.com"})
    assert "LEARNMESH_USER_ADMIN_EMAILS" in str(err.value)
    assert "learnmesh users promote" in str(err.value)
    toml = tmp_path / "old.toml"
    toml.write_text('[user]\nadmin_emails = "boss@example.com"\n')
    with pytest.raises(config.ConfigError) as err:
        config.load(toml, env={})
    assert "user.admin_emails" in str(err.value) and "users promote" in str(err.value)
    assert not hasattr(config.load(env={}), "user")


async def test_registering_any_address_makes_a_free_user(mesh: Mesh) -> None:
    for email in ("admin@example.org", "root@localhost.example", new_email("admin")):
        registered = await mesh.auth.Register(
            auth_pb2.RegisterRequest(
                email=email, password=PASSWORD, display_name="Would Be", accepted_terms=True
            )
        )
        assert registered.user.role == user_pb2.ROLE_FREE_USER


def test_the_command_offers_the_roles_of_the_contract() -> None:
    contract = [n.removeprefix("ROLE_").lower() for n in user_pb2.Role.keys()[1:]]
    assert list(ROLES) == contract


# --- learnmesh users promote ---------------------------------------------------------------


async def test_promote_as_an_operator_runs_it(mesh: Mesh) -> None:
    """A real process on the mesh's database: the role, the audit row, the next token."""
    registered = await mesh.register(new_email("Promoted"))
    email = registered.user.email
    code, out, err = await run_command(mesh, "users", "promote", email.upper(), "--role", "admin")
    assert code == 0, err
    assert email in out and "free_user -> admin" in out and "operator" in out
    assert "Traceback" not in err

    # The access token issued before the role change is refused from then on (every server
    # hears the change); the next refresh carries the new role.
    for _ in range(100):
        if not (await introspect(mesh, registered.access_token)).active:
            break
        await asyncio.sleep(0.02)
    assert not (await introspect(mesh, registered.access_token)).active
    refreshed = await mesh.auth.Refresh(
        auth_pb2.RefreshRequest(refresh_token=registered.refresh_token)
    )
    assert list((await introspect(mesh, refreshed.access_token)).roles) == ["admin"]
    users = await mesh.user.ListUsers(
        user_pb2.ListUsersRequest(page_size=1), metadata=bearer(refreshed.access_token)
    )
    assert len(users.users) == 1  # an admin-only method now answers

    rows = await audit_rows(mesh, registered.user.id, "role.changed")
    assert [(r.actor, json.loads(r.details)) for r in rows] == [
        ("operator", {"new": "admin", "old": "free_user", "via": "cli"})
    ]

    # Again: nothing to change, nothing recorded.
    code, out, _ = await run_command(mesh, "users", "promote", email, "--role", "admin")
    assert code == 0 and "already has the role admin" in out
    assert len(await audit_rows(mesh, registered.user.id, "role.changed")) == 1


@pytest.mark.parametrize("role", ["instructor", "moderator", "subscriber", "free_user"])
async def test_promote_gives_any_role_of_the_contract(
    mesh: Mesh, role: str, tmp_path: Path
) -> None:
    registered = await mesh.register(new_email(role))
    args = ["--config", config_file(mesh, tmp_path), "users", "promote"]
    start = "subscriber" if role == "free_user" else "free_user"
    if start != "free_user":
        assert await main(*args, registered.user.email, "--role", start) == 0
    assert await main(*args, registered.user.email, "--role", role) == 0
    refreshed = await mesh.auth.Refresh(
        auth_pb2.RefreshRequest(refresh_token=registered.refresh_token)
    )
    assert list((await introspect(mesh, refreshed.access_token)).roles) == [role]
    me = await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=bearer(refreshed.access_token))
    assert me.user.role == user_pb2.Role.Value("ROLE_" + role.upper())


async def test_promote_an_unknown_email_exits_1(mesh: Mesh) -> None:
    email = new_email("nobody")
    code, out, err = await run_command(mesh, "users", "promote", email, "--role", "admin")
    assert code == 1
    assert f"no user with email {email}" in err
    assert "Traceback" not in err and out == ""


async def test_promote_refuses_an_unknown_role(mesh: Mesh, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:  # argparse: exit 2 with the choices
        await main(
            "--config", config_file(mesh, tmp_path), "users", "promote", "x@y.z", "--role", "root"
        )
    assert exited.value.code == 2


async def test_promote_will_not_demote_the_last_admin(mesh: Mesh, tmp_path: Path) -> None:
    (last,) = await only_admins(mesh, 1)
    args = ["--config", config_file(mesh, tmp_path), "users", "promote", last.user.email]
    assert await main(*args, "--role", "free_user") == 1
    assert await admins_of(mesh) == [last.user.id]


async def test_promote_without_the_user_tables_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text(f'var_dir = "{tmp_path}"\ndatabase_url = "sqlite:///{tmp_path / "empty.db"}"\n')
    promote = ["--config", str(path), "users", "promote", "a@b.example", "--role", "admin"]
    code, _, err = await run_to_end([*LEARNMESH, *promote])
    assert code == 1
    assert "learnmesh migrate user" in err
    assert "Traceback" not in err and "SELECT" not in err


# --- the last admin under concurrency ------------------------------------------------------


async def outcome(call: object) -> str:
    """ "OK", or the code and reason the call ended with."""
    try:
        await call  # type: ignore[misc]
    except aio.AioRpcError as exc:
        return f"{exc.code().name} {error_reason(exc)}"
    return "OK"


async def test_two_admins_demoting_each_other_at_once_leave_one(mesh: Mesh) -> None:
    a, b = await only_admins(mesh, 2)
    for _ in range(ROUNDS):
        demote_b = mesh.user.SetRole(
            user_pb2.SetRoleRequest(user_id=b.user.id, role=user_pb2.ROLE_FREE_USER),
            metadata=bearer(a.access_token),
        )
        demote_a = mesh.user.SetRole(
            user_pb2.SetRoleRequest(user_id=a.user.id, role=user_pb2.ROLE_FREE_USER),
            metadata=bearer(b.access_token),
        )
        results = await asyncio.gather(outcome(demote_b), outcome(demote_a))
        # The loser is refused by the database (LAST_ADMIN) or, when the winner's demotion
        # already reached every server, by the auth link: a demoted admin's older tokens stop.
        assert sorted(results) in (
            ["FAILED_PRECONDITION LAST_ADMIN", "OK"],
            ["OK", "UNAUTHENTICATED SESSION_REVOKED"],
        )
        remaining = await admins_of(mesh)
        assert len(remaining) == 1
        # Back to two admins for the next round (the survivor's token is still admin).
        survivor = a if remaining == [a.user.id] else b
        loser = b if survivor is a else a
        await mesh.user.SetRole(
            user_pb2.SetRoleRequest(user_id=loser.user.id, role=user_pb2.ROLE_ADMIN),
            metadata=bearer(survivor.access_token),
        )
        assert await admins_of(mesh) == sorted([a.user.id, b.user.id])


async def test_two_admins_deleting_themselves_at_once_leave_one(mesh: Mesh) -> None:
    for _ in range(ROUNDS):
        a, b = await only_admins(mesh, 2)
        results = await asyncio.gather(
            *(
                outcome(
                    mesh.user.DeleteUser(
                        user_pb2.DeleteUserRequest(user_id=x.user.id),
                        metadata=bearer(x.access_token),
                    )
                )
                for x in (a, b)
            )
        )
        assert sorted(results) == ["FAILED_PRECONDITION LAST_ADMIN", "OK"]
        assert len(await admins_of(mesh)) == 1
