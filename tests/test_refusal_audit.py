"""Calls the server chain refuses leave rows in the audit trail, over the wire with mTLS:
forged and unknown tokens, users refused by a method's policy, certificates not allowed on
internal methods; a flood of forged tokens leaves a bounded number of rows with counts."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from grpc import aio
from prometheus_client import REGISTRY
from sqlalchemy import MetaData, text

from learnmesh.audit import RefusalTrail, audit_table
from learnmesh.auth.v1 import auth_pb2
from learnmesh.db import Database
from learnmesh.kernel.principal import CallInfo
from learnmesh.kernel.refusals import TOKEN_REJECTED, Refusal
from learnmesh.user.v1 import user_pb2
from tests.conftest import Mesh, bearer, mesh_settings, running_mesh, scratch_database
from tests.support.mesh import new_email, signing_key

WINDOW = 0.2  # seconds between the trail's writes in these meshes
CALL_ID = re.compile(r"[0-9a-f]{32}")
GET_ME = "/learnmesh.user.v1.UserService/GetMe"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
async def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    tmp = tmp_path_factory.mktemp(f"refusals-{request.param}")
    async with scratch_database(request.param, tmp) as url:
        settings = mesh_settings(tmp, url, refusal_audit_window=WINDOW)
        assert settings.tls.enabled
        async with running_mesh(settings) as m:
            yield m


def rid(tag: str) -> tuple[str, str]:
    return ("x-request-id", f"{tag}-{uuid.uuid4().hex}")


async def rows_where(mesh: Mesh, table: str, where: str, **params: Any) -> list[dict[str, Any]]:
    async with mesh.runtime.db.transaction() as session:
        found = await session.execute(
            text(f"SELECT * FROM {table} WHERE {where} ORDER BY at, id"), params
        )
        rows = [dict(r._mapping) for r in found.all()]
    for row in rows:
        row["details"] = json.loads(row["details"])
    return rows


async def rows_of(mesh: Mesh, table: str, request: tuple[str, str]) -> list[dict[str, Any]]:
    """The rows made by the call with this request id, once the trail wrote them."""
    for _ in range(100):
        if rows := await rows_where(mesh, table, "request_id = :r", r=request[1]):
            return rows
        await asyncio.sleep(WINDOW / 2)
    raise AssertionError(f"no row in {table} for {request[1]}")


async def refused(call: Any, code: grpc.StatusCode) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value


async def test_bad_tokens_each_leave_one_row_with_the_reason_never_the_token(
    mesh: Mesh,
) -> None:
    registered = await mesh.register(new_email("forged"))
    claims = jwt.decode(registered.access_token, options={"verify_signature": False})
    kid, key = signing_key(mesh)
    stranger = ec.generate_private_key(ec.SECP256R1())

    def signed(changes: dict[str, Any], with_key: Any = key, with_kid: str = kid) -> str:
        payload = {**claims, **changes}
        return jwt.encode(payload, with_key, algorithm="ES256", headers={"kid": with_kid})

    now = int(time.time())
    # An expired token the mesh signed is ordinary (its holder refreshes): refused, no row.
    expired = rid("expired")
    await refused(
        mesh.user.GetMe(
            user_pb2.GetMeRequest(),
            metadata=(*bearer(signed({"exp": now - 3600, "iat": now - 4000})), expired),
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    cases = {
        "bad_signature": f"Bearer {signed({}, stranger)}",
        "unknown_kid": f"Bearer {signed({'exp': now - 3600}, stranger, 'no-such-kid')}",
        "wrong_issuer": f"Bearer {signed({'iss': 'someone-else'})}",
        "wrong_audience": f"Bearer {signed({'aud': 'another-app'})}",
        "malformed": "Bearer not.a.jwt",
        "malformed_header": "Basic dXNlcjpwYXNz",
    }
    calls = {}
    for reason, header in cases.items():
        calls[reason] = request = rid(reason)
        await refused(
            mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=(("authorization", header), request)),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    for reason, request in calls.items():
        (row,) = await rows_of(mesh, "user_audit", request)
        assert (row["event"], row["subject"], row["actor"]) == (TOKEN_REJECTED, "", "")
        assert row["client_address"] == "127.0.0.1"
        assert CALL_ID.fullmatch(row["call_id"]) and row["call_id"] != request[1]
        details = row["details"]
        assert details["reason"] == reason
        assert (details["method"], details["count"]) == (GET_ME, 1)
        assert details["caller"].endswith("/client/tests")  # the certificate that called
        assert cases[reason].split(" ", 1)[1] not in json.dumps(row, default=str)
    # The trail has written every window since the expired token's call: still no row.
    assert await rows_where(mesh, "user_audit", "request_id = :r", r=expired[1]) == []

    # On a public method a bad token is dropped and the call goes on; the row says so in
    # the table of the method's own service.
    request = rid("public")
    await mesh.auth.GetJwks(
        auth_pb2.GetJwksRequest(), metadata=(*bearer(signed({}, stranger)), request)
    )
    (row,) = await rows_of(mesh, "auth_audit", request)
    assert (row["event"], row["details"]["reason"]) == (TOKEN_REJECTED, "bad_signature")
    assert row["details"]["method"] == "/learnmesh.auth.v1.AuthService/GetJwks"


async def test_users_refused_by_role_or_ownership_are_recorded(mesh: Mesh) -> None:
    alice = await mesh.register(new_email("alice"))
    bob = await mesh.register(new_email("bob"))
    as_alice = bearer(alice.access_token)

    request = rid("role")
    await refused(
        mesh.user.ListUsers(user_pb2.ListUsersRequest(), metadata=(*as_alice, request)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    (row,) = await rows_of(mesh, "user_audit", request)
    assert (row["event"], row["subject"]) == ("auth.permission_denied", alice.user.id)
    assert row["details"]["method"] == "/learnmesh.user.v1.UserService/ListUsers"
    assert (row["details"]["reason"], row["details"]["required"]) == ("role", "role:admin")
    assert (row["client_address"], row["details"]["count"]) == ("127.0.0.1", 1)

    request = rid("owner")
    await refused(
        mesh.user.GetUser(
            user_pb2.GetUserRequest(user_id=bob.user.id), metadata=(*as_alice, request)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    (row,) = await rows_of(mesh, "user_audit", request)
    assert (row["event"], row["subject"]) == ("auth.permission_denied", alice.user.id)
    assert (row["details"]["reason"], row["details"]["required"]) == ("not_owner", "owner")

    # Her own profile is hers: no row.
    request = rid("own")
    await mesh.user.GetUser(
        user_pb2.GetUserRequest(user_id=alice.user.id), metadata=(*as_alice, request)
    )
    await asyncio.sleep(3 * WINDOW)
    assert await rows_where(mesh, "user_audit", "request_id = :r", r=request[1]) == []


async def test_certificates_not_allowed_on_internal_methods_are_recorded(mesh: Mesh) -> None:
    create = user_pb2.CreateUserRequest(
        user_id=str(uuid.uuid4()), email=new_email("peer"), display_name="Peer"
    )
    domain = mesh.settings.tls.trust_domain
    for stub, caller in (
        (mesh.user, f"spiffe://{domain}/client/tests"),  # an end user's client certificate
        (mesh.user_as("course"), f"spiffe://{domain}/service/course"),  # not among callers
    ):
        request = rid("peer")
        await refused(
            stub.CreateUser(create, metadata=(request,)), grpc.StatusCode.PERMISSION_DENIED
        )
        (row,) = await rows_of(mesh, "user_audit", request)
        assert (row["event"], row["subject"], row["client_address"]) == (
            "peer.denied",
            "",
            "127.0.0.1",
        )
        details = row["details"]
        assert details["method"] == "/learnmesh.user.v1.UserService/CreateUser"
        assert (details["reason"], details["caller"]) == ("not_allowed", caller)
        assert details["required"] == "callers:auth"
        assert details["count"] == 1


async def test_a_flood_of_forged_tokens_is_refused_and_leaves_few_rows_with_counts(
    mesh: Mesh,
) -> None:
    stranger = ec.generate_private_key(ec.SECP256R1())
    kid, _ = signing_key(mesh)
    forged = jwt.encode(
        {"sub": "x", "iss": "learnmesh", "aud": "learnmesh"},
        stranger,
        algorithm="ES256",
        headers={"kid": kid},
    )
    tag = f"flood{uuid.uuid4().hex[:8]}"
    calls, workers = 2000, 40
    codes: list[grpc.StatusCode] = []

    async def caller(worker: int) -> None:
        for n in range(worker, calls, workers):
            try:
                await mesh.user.GetMe(
                    user_pb2.GetMeRequest(),
                    metadata=(*bearer(forged), ("x-request-id", f"{tag}-{n}")),
                )
            except aio.AioRpcError as exc:
                codes.append(exc.code())
            else:
                codes.append(grpc.StatusCode.OK)

    started = time.monotonic()
    await asyncio.gather(*(caller(w) for w in range(workers)))
    elapsed = time.monotonic() - started
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * calls

    rows: list[dict[str, Any]] = []
    for _ in range(100):
        rows = await rows_where(mesh, "user_audit", "request_id LIKE :p", p=f"{tag}-%")
        if sum(r["details"]["count"] for r in rows) >= calls:
            break
        await asyncio.sleep(WINDOW)
    # Every refusal counted, none dropped; one row per window the flood lasted.
    assert sum(r["details"]["count"] for r in rows) == calls
    assert len(rows) <= elapsed / WINDOW + 2, (len(rows), elapsed)
    assert len(rows) < calls / 10
    for row in rows:
        assert (row["event"], row["details"]["reason"]) == (TOKEN_REJECTED, "bad_signature")
        assert row["client_address"] == "127.0.0.1"
        assert forged not in json.dumps(row, default=str)


def dropped(event: str) -> float:
    value = REGISTRY.get_sample_value("learnmesh_audit_refusals_dropped_total", {"event": event})
    return value or 0.0


def forged_refusal(n: int) -> Refusal:
    call = CallInfo(f"192.0.2.{n}", "", f"req-{n}", "", f"{n:032x}")
    return Refusal(TOKEN_REJECTED, GET_ME, "bad_signature", call)


async def test_the_trail_keeps_at_most_capacity_rows_and_counts_what_it_drops(
    tmp_path: Path,
) -> None:
    """Many addresses (an attacker's IPv6 block) fill the window; the rest is counted."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'trail.db'}")
    table = audit_table("user_audit", MetaData())
    async with db.engine.begin() as conn:
        await conn.run_sync(table.metadata.create_all)
    trail = RefusalTrail(db, {"learnmesh.user.v1.UserService": table}, window=60, capacity=3)
    before = dropped(TOKEN_REJECTED)
    for n in range(10):
        trail.record(forged_refusal(n))
    trail.record(forged_refusal(1))  # a repeat of a waiting one still counts
    await trail.flush()
    async with db.transaction() as session:
        found = (
            await session.execute(text("SELECT client_address, details FROM user_audit"))
        ).all()
    counts = {address: json.loads(details)["count"] for address, details in found}
    assert counts == {"192.0.2.0": 1, "192.0.2.1": 2, "192.0.2.2": 1}
    assert dropped(TOKEN_REJECTED) - before == 7

    # A failed write (here: a database without the table) is dropped and counted, not
    # kept to grow memory.
    await db.dispose()
    trail.db = Database(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    trail.record(forged_refusal(42))
    await trail.flush()
    assert dropped(TOKEN_REJECTED) - before == 8
    assert trail._pending == {}
    await trail.db.dispose()


async def test_an_orderly_stop_writes_the_waiting_refusals(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'stop.db'}")
    table = audit_table("user_audit", MetaData())
    async with db.engine.begin() as conn:
        await conn.run_sync(table.metadata.create_all)
    trail = RefusalTrail(db, {"learnmesh.user.v1.UserService": table}, window=60)
    trail.start()
    trail.record(forged_refusal(7))
    await trail.aclose()  # long before the window ends
    async with db.transaction() as session:
        query = text("SELECT client_address, request_id, call_id FROM user_audit")
        found = (await session.execute(query)).all()
    assert [tuple(r) for r in found] == [("192.0.2.7", "req-7", f"{7:032x}")]
    await db.dispose()
