"""mTLS on the mesh: who may connect, and who may call internal methods."""

from __future__ import annotations

import asyncio
import ssl
import uuid
import warnings
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc import aio

from learnmesh.client import ClientFactory
from learnmesh.user.v1 import user_pb2, user_pb2_grpc
from tests.conftest import Mesh, mesh_settings, running_mesh
from tests.support.authority import Authority


@pytest.fixture(scope="module")
async def tls_mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    tmp = tmp_path_factory.mktemp("mtls")
    settings = mesh_settings(tmp, f"sqlite+aiosqlite:///{tmp / 'db.sqlite'}")
    settings = replace(
        settings,
        tls=replace(
            settings.tls,
            extra_callers="learnmesh.user.v1.UserService/BatchGetUsers=reporting",
        ),
    )
    async with running_mesh(settings) as mesh:
        yield mesh


async def connects(address: str, credentials: grpc.ChannelCredentials | None) -> bool:
    channel = (
        aio.insecure_channel(address)
        if credentials is None
        else aio.secure_channel(address, credentials)
    )
    async with channel:
        try:
            await user_pb2_grpc.UserServiceStub(channel).GetMe(user_pb2.GetMeRequest(), timeout=3)
        except aio.AioRpcError as exc:
            return exc.code() != grpc.StatusCode.UNAVAILABLE
    return True


BATCH = user_pb2.BatchGetUsersRequest(user_ids=[str(uuid.uuid4())])


async def test_plaintext_client_is_refused(tls_mesh: Mesh) -> None:
    assert not await connects(tls_mesh.server.address, None)


async def test_client_without_certificate_is_refused(tls_mesh: Mesh) -> None:
    ca = (Path(tls_mesh.settings.var_dir) / "certs" / "ca.pem").read_bytes()
    assert not await connects(tls_mesh.server.address, grpc.ssl_channel_credentials(ca))


async def test_certificate_from_another_ca_is_refused(tls_mesh: Mesh, tmp_path: Path) -> None:
    ours = Authority(Path(tls_mesh.settings.var_dir) / "certs")
    other = Authority(tmp_path)  # same trust domain name, different CA
    foreign = other.channel_credentials("auth", "service", trust=ours.pem)
    assert not await connects(tls_mesh.server.address, foreign)


async def test_issued_client_certificate_works(tls_mesh: Mesh) -> None:
    ca = Authority(Path(tls_mesh.settings.var_dir) / "certs")
    with pytest.raises(aio.AioRpcError) as err:
        async with aio.secure_channel(
            tls_mesh.server.address, ca.channel_credentials("web")
        ) as channel:
            await user_pb2_grpc.UserServiceStub(channel).GetMe(user_pb2.GetMeRequest(), timeout=3)
    # Through the handshake and the chain: refused only for want of an access token.
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("name", "kind", "allowed"),
    [
        ("auth", "service", True),  # in the proto option's callers
        ("reporting", "service", True),  # added by configuration (tls.extra_callers)
        ("course", "service", True),
        ("bridge", "service", False),  # a mesh service, but not allowed here
        ("auth", "client", False),  # same name, but a client identity, not a service
    ],
)
async def test_internal_method_accepts_only_allowed_identities(
    tls_mesh: Mesh, name: str, kind: str, allowed: bool
) -> None:
    stub = user_pb2_grpc.UserServiceStub(tls_mesh.channel_as(name, kind))
    if allowed:
        reply = await stub.BatchGetUsers(BATCH, timeout=5)
        assert list(reply.users) == []
        return
    with pytest.raises(aio.AioRpcError) as err:
        await stub.BatchGetUsers(BATCH, timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"/{kind}/{name} is not among its allowed callers" in (err.value.details() or "")


async def test_old_tls_versions_are_refused(tls_mesh: Mesh) -> None:
    host, port = tls_mesh.server.address.rsplit(":", 1)
    ca = Authority(Path(tls_mesh.settings.var_dir) / "certs")
    tests = ca.issued("tests")  # the certificate the mesh's test channel presents
    for version, accepted in ((ssl.TLSVersion.TLSv1_1, False), (ssl.TLSVersion.TLSv1_2, True)):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(ca.ca_file)
        context.load_cert_chain(tests.cert, tests.key)
        context.set_alpn_protocols(["h2"])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is, rightly
                context.minimum_version = version
                context.maximum_version = version
        except ValueError:
            continue  # this OpenSSL cannot even offer it: refused all the same
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host, int(port), ssl=context, server_hostname="localhost"),
                5,
            )
        except (ssl.SSLError, ConnectionError):
            assert not accepted, f"{version.name} was refused"
        else:
            writer.close()
            assert accepted, f"{version.name} was accepted"


async def test_a_static_list_of_replicas_passes_the_hostname_check(tls_mesh: Mesh) -> None:
    """``host:port,host:port`` over mTLS: the handshake checks the first address's host,
    not the whole list (which no certificate names: every call was UNAVAILABLE)."""
    address = tls_mesh.server.address
    settings = replace(tls_mesh.settings, user_address=f"{address},{address}")
    factory = ClientFactory.for_caller(settings, "web")
    try:
        for _ in range(4):
            with pytest.raises(aio.AioRpcError) as err:
                await factory.stub("user").GetMe(user_pb2.GetMeRequest(), timeout=3)
            # Through the handshake and the chain: refused only for want of an access token.
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await factory.close()
