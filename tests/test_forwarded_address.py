"""The end user's address travels with the calls a mesh service makes for them, over mTLS:
the user service records the registering user's address, not the auth service's; the
header is believed only from mesh service identities of the trust domain."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from grpc import aio
from sqlalchemy import text

from learnmesh import certs, tls
from learnmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from learnmesh.user.v1 import user_pb2, user_pb2_grpc
from tests.conftest import PASSWORD, Mesh
from tests.support.mesh import new_email

FORWARDED = "x-learnmesh-client-address"
# Where the test client connects from (any 127/8 address is the loopback on Linux).
END_USER = "127.0.0.9"


@asynccontextmanager
async def relay_from(source: str, target: str) -> AsyncIterator[str]:
    """A TCP relay on 127.0.0.1 whose connections reach ``target`` from ``source``: the
    server sees a client at ``source`` (TLS passes through untouched)."""
    host, port = target.rsplit(":", 1)
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            host, int(port), local_addr=(source, 0)
        )
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def track(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(handle(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(track, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def channel_to(
    mesh: Mesh, target: str, name: str, kind: str, trust_domain: str | None = None
) -> aio.Channel:
    """A channel to ``target`` presenting a certificate from the mesh's CA."""
    directory = tls.certs_dir(mesh.settings)
    domain = trust_domain or mesh.settings.tls.trust_domain
    key, cert = certs.issue(directory, name, domain, kind=kind).read()
    credentials = grpc.ssl_channel_credentials(
        (directory / "ca.pem").read_bytes(), private_key=key, certificate_chain=cert
    )
    return aio.secure_channel(target, credentials)


async def addresses(mesh: Mesh, table: str, subject: str) -> list[tuple[str, str]]:
    """(event, client_address) of the subject's rows in ``table``."""
    async with mesh.runtime.db.transaction() as session:
        found = await session.execute(
            text(f"SELECT event, client_address FROM {table} WHERE subject = :s ORDER BY at"),
            {"s": subject},
        )
        return [(r.event, r.client_address) for r in found.all()]


def register(email: str) -> auth_pb2.RegisterRequest:
    return auth_pb2.RegisterRequest(
        email=email, password=PASSWORD, display_name="Far Away", accepted_terms=True
    )


async def test_the_user_service_records_the_registering_users_address(mesh: Mesh) -> None:
    assert mesh.settings.tls.enabled
    async with relay_from(END_USER, mesh.server.address) as relay:
        channel = channel_to(mesh, relay, "tests", "client")
        try:
            done = await auth_pb2_grpc.AuthServiceStub(channel).Register(register(new_email("far")))
        finally:
            await channel.close()
    assert await addresses(mesh, "auth_audit", done.user.id) == [("account.registered", END_USER)]
    # CreateUser came from the auth service (127.0.0.1), on the user's behalf.
    assert await addresses(mesh, "user_audit", done.user.id) == [("user.created", END_USER)]


async def test_an_end_users_own_header_is_ignored(mesh: Mesh) -> None:
    """A client certificate, or a service certificate of another trust domain, cannot
    choose the address recorded for its calls; nor can a mesh service send a non-address."""
    forged = ((FORWARDED, "203.0.113.7"),)
    done = await mesh.auth.Register(register(new_email("forger")), metadata=forged)
    assert await addresses(mesh, "auth_audit", done.user.id) == [
        ("account.registered", "127.0.0.1")
    ]
    assert await addresses(mesh, "user_audit", done.user.id) == [("user.created", "127.0.0.1")]

    foreign = channel_to(mesh, mesh.server.address, "intruder", "service", "elsewhere.example")
    try:
        done = await auth_pb2_grpc.AuthServiceStub(foreign).Register(
            register(new_email("foreign")), metadata=forged
        )
    finally:
        await foreign.close()
    assert await addresses(mesh, "auth_audit", done.user.id) == [
        ("account.registered", "127.0.0.1")
    ]

    user_id = str(uuid.uuid4())
    await mesh.user_as("auth").CreateUser(
        user_pb2.CreateUserRequest(
            user_id=user_id, email=new_email("junk"), display_name="Junk Header"
        ),
        metadata=((FORWARDED, "127.0.0.1:80; DROP TABLE"),),
    )
    assert await addresses(mesh, "user_audit", user_id) == [("user.created", "127.0.0.1")]


@pytest.mark.parametrize("address", ["198.51.100.4", "2001:db8::7"])
async def test_a_mesh_service_forwards_the_address(mesh: Mesh, address: str) -> None:
    user_id = str(uuid.uuid4())
    stub: user_pb2_grpc.UserServiceStub = mesh.user_as("auth")
    await stub.CreateUser(
        user_pb2.CreateUserRequest(
            user_id=user_id, email=new_email("fwd"), display_name="Forwarded"
        ),
        metadata=((FORWARDED, address),),
    )
    assert await addresses(mesh, "user_audit", user_id) == [("user.created", address)]
