"""The audit trail over the wire: the server's call id beside the caller's request id (in
both services' tables), and the security events that used to leave no trace."""

from __future__ import annotations

import re

from sqlalchemy import text

from learnmesh.auth.v1 import auth_pb2
from tests.auth_support import new_email
from tests.conftest import Mesh

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
