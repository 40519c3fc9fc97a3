"""What tests read and make on a running mesh (tests.conftest.Mesh): new accounts' emails,
token introspection, the signing key, audit rows, row counts and the mail in its Maildir."""

from __future__ import annotations

import asyncio
import json
import mailbox
import re
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import Message
from sqlalchemy import text

from learnmesh.auth.v1 import auth_pb2
from learnmesh.events.v1 import events_pb2
from tests.conftest import Mesh

M = TypeVar("M", bound=Message)


async def introspect(mesh: Mesh, token: str) -> auth_pb2.IntrospectTokenResponse:
    """IntrospectToken as a mesh service calls it (internal: the user service's identity)."""
    response: auth_pb2.IntrospectTokenResponse = await mesh.auth_as("user").IntrospectToken(
        auth_pb2.IntrospectTokenRequest(token=token)
    )
    return response


def new_email(tag: str = "user") -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}@example.com"


def signing_key(mesh: Mesh) -> tuple[str, ec.EllipticCurvePrivateKey]:
    """The mesh's (only) signing key, read from its key directory: (kid, key)."""
    (pem,) = (Path(mesh.settings.var_dir) / "keys" / "jwt").glob("*.pem")
    key = serialization.load_pem_private_key(pem.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return pem.stem, key


async def audit_events(mesh: Mesh, subject: str) -> list[tuple[str, dict[str, Any]]]:
    """(event, details) of the auth service's audit rows of ``subject``, oldest first."""
    async with mesh.runtime.db.transaction() as session:
        rows = await session.execute(
            text("SELECT event, details FROM auth_audit WHERE subject = :s ORDER BY at, id"),
            {"s": subject},
        )
        return [(event, json.loads(details)) for event, details in rows.all()]


async def audit_rows(mesh: Mesh, subject: str, event: str | None = None) -> list[Any]:
    """The user service's audit rows of ``subject`` (of ``event`` only, when given), oldest
    first."""
    query = "SELECT event, subject, actor, client_address, request_id, details FROM user_audit "
    query += "WHERE subject = :subject"
    params = {"subject": subject}
    if event:
        query += " AND event = :event"
        params["event"] = event
    async with mesh.runtime.db.engine.connect() as conn:
        return list((await conn.execute(text(query + " ORDER BY at"), params)).all())


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


async def outbox_events(mesh: Mesh, service: str, subject: str) -> list[events_pb2.Event]:
    """The events ``service`` wrote to its outbox about ``subject``, in commit order (the
    relay keeps published rows for the retention period)."""
    query = text(f"SELECT payload FROM {service}_outbox WHERE subject = :s ORDER BY seq")
    async with mesh.runtime.db.transaction() as session:
        rows = (await session.execute(query, {"s": subject})).scalars().all()
    return [events_pb2.Event.FromString(bytes(payload)) for payload in rows]


def data_of(event: events_pb2.Event, message: type[M]) -> M:
    """The event's data, unpacked into ``message`` (failing when it holds another type)."""
    unpacked = message()
    assert event.data.Unpack(unpacked), (event.type, event.data.type_url)
    return unpacked


async def wait_until(predicate: Callable[[], Awaitable[bool]], within: float = 15.0) -> None:
    """Polls ``predicate`` until it holds (events are applied after the call returns)."""
    deadline = asyncio.get_running_loop().time() + within
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {within}s: {predicate.__qualname__}")
        await asyncio.sleep(0.05)
