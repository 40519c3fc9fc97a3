"""Helpers shared by the auth tests: reading rich error details, the audit trail, mail."""

from __future__ import annotations

import asyncio
import json
import mailbox
import re
import uuid
from pathlib import Path
from typing import Any

from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from sqlalchemy import text

from learnmesh.auth.v1 import auth_pb2
from tests.conftest import Mesh


async def introspect(mesh: Mesh, token: str) -> auth_pb2.IntrospectTokenResponse:
    """IntrospectToken as a mesh service calls it (internal: the user service's identity)."""
    response: auth_pb2.IntrospectTokenResponse = await mesh.auth_as("user").IntrospectToken(
        auth_pb2.IntrospectTokenRequest(token=token)
    )
    return response


def new_email(tag: str = "user") -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}@example.com"


def status_of(err: aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status the server put in ``grpc-status-details-bin``."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)  # a -bin key's value
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no status details in {err!r}")


def _detail(err: aio.AioRpcError, kind: type[Any]) -> Any:
    for packed in status_of(err).details:
        message = kind()
        if packed.Unpack(message):
            return message
    raise AssertionError(f"no {kind.__name__} detail in {err!r}")


def error_reason(err: aio.AioRpcError) -> str:
    info: error_details_pb2.ErrorInfo = _detail(err, error_details_pb2.ErrorInfo)
    return info.reason


def violated_fields(err: aio.AioRpcError) -> dict[str, str]:
    bad: error_details_pb2.BadRequest = _detail(err, error_details_pb2.BadRequest)
    return {v.field: v.description for v in bad.field_violations}


def retry_delay(err: aio.AioRpcError) -> float:
    info: error_details_pb2.RetryInfo = _detail(err, error_details_pb2.RetryInfo)
    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9


async def audit_events(mesh: Mesh, subject: str) -> list[tuple[str, dict[str, Any]]]:
    """(event, details) of the subject's audit rows, oldest first."""
    async with mesh.runtime.db.transaction() as session:
        rows = await session.execute(
            text("SELECT event, details FROM auth_audit WHERE subject = :s ORDER BY at, id"),
            {"s": subject},
        )
        return [(event, json.loads(details)) for event, details in rows.all()]


async def count_rows(mesh: Mesh, table: str) -> int:
    async with mesh.runtime.db.transaction() as session:
        return int(await session.scalar(text(f"SELECT count(*) FROM {table}")) or 0)


def mails_to(mail_dir: Path, address: str) -> list[str]:
    """Bodies of the messages in the Maildir addressed to ``address`` (none while the first
    writer is still making the Maildir's folders)."""
    if not all((mail_dir / sub).is_dir() for sub in ("tmp", "new", "cur")):
        return []
    box = mailbox.Maildir(mail_dir, create=False)
    try:
        return [
            bytes(message.get_payload(decode=True)).decode()  # a single-part message: bytes
            for message in box
            if message["To"] == address
        ]
    except FileNotFoundError:
        return []
    finally:
        box.close()


async def wait_for_mail(mail_dir: Path, address: str, count: int = 1) -> list[str]:
    """The mails to ``address`` once there are ``count`` of them (written in the background)."""
    for _ in range(100):
        found = mails_to(mail_dir, address)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"no mail to {address} arrived")


def reset_token_in(body: str) -> str:
    match = re.search(r"^Token: (\S+)$", body, re.MULTILINE)
    assert match, body
    return match.group(1)
