"""Fixtures: a real mesh (auth + user) on an ephemeral port, on SQLite and on PostgreSQL.

PostgreSQL comes from LEARNMESH_TEST_POSTGRES_URL (default: the local server's `test`
database). When it is unreachable its tests skip with the reason, except under CI=true,
where they fail. Each mesh gets a database of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from grpc import aio

from learnmesh import cli, config, tls
from learnmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from learnmesh.eventing.bus import Bus
from learnmesh.server import MeshServer, build_runtime, start_server
from learnmesh.service import Runtime, definition
from learnmesh.user.v1 import user_pb2_grpc
from tests.support.authority import Authority

POSTGRES_URL = os.environ.get(
    "LEARNMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() == "true"
PASSWORD = "correct horse battery staple"
GENEROUS_LIMITS: dict[str, Any] = {
    name: 100_000
    for name in (
        "free_per_minute",
        "login_per_minute",
        "login_per_hour",
        "refresh_per_minute",
        "refresh_per_hour",
        "register_per_minute",
        "register_per_hour",
        "password_reset_per_minute",
        "password_reset_per_hour",
    )
}
# Mesh.register makes the account of this email an admin the way an operator does
# (`learnmesh users promote EMAIL --role admin`): registering it alone makes no admin.
ADMIN_EMAIL = "admin@example.com"


async def postgres_unreachable() -> str | None:
    """Why PostgreSQL cannot be used, or None when it can."""
    try:
        conn = await asyncpg.connect(POSTGRES_URL, timeout=3)
    except (OSError, asyncpg.PostgresError) as exc:
        return f"PostgreSQL at {POSTGRES_URL} unreachable ({type(exc).__name__}: {exc})"
    await conn.close()
    return None


@asynccontextmanager
async def scratch_database(backend: str, tmp: Path) -> AsyncIterator[str]:
    """A database URL of the backend's that exists only inside the block."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp / 'learnmesh.db'}"
        return
    reason = await postgres_unreachable()
    if reason:
        if IN_CI:
            pytest.fail(f"{reason}; CI=true requires PostgreSQL")
        pytest.skip(reason)
    name = f"learnmesh_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(POSTGRES_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        base = POSTGRES_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
        yield f"{base}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def mesh_settings(tmp: Path, database_url: str, **auth: Any) -> config.Settings:
    """Settings of a test mesh: everything under ``tmp``; ``auth`` overrides AuthSettings."""
    base = config.load(env={})
    return replace(
        base,
        var_dir=str(tmp),
        database_url=database_url,
        server=replace(base.server, port=0, grace=0.5),
        auth=replace(base.auth, throttle_per_address=1000, **auth),
        # Generous limits (the link still counts every call): suites log in many times from
        # 127.0.0.1. tests/test_ratelimit.py and the login-flood test use the real ones.
        limits=replace(base.limits, **GENEROUS_LIMITS),
    )


@dataclass
class Mesh:
    """A running mesh and stubs that reach it over a real channel."""

    server: MeshServer
    runtime: Runtime
    # With mTLS, this channel presents the client certificate spiffe://…/client/tests.
    channel: aio.Channel
    settings: config.Settings
    extra_channels: list[aio.Channel] = field(default_factory=list)
    _as: dict[tuple[str, str], aio.Channel] = field(default_factory=dict)

    def user_as(self, service: str) -> user_pb2_grpc.UserServiceStub:
        """The user service as mesh service ``service`` calls it (for internal methods)."""
        return user_pb2_grpc.UserServiceStub(self.channel_as(service))

    def auth_as(self, service: str) -> auth_pb2_grpc.AuthServiceStub:
        return auth_pb2_grpc.AuthServiceStub(self.channel_as(service))

    def channel_as(self, name: str, kind: str = "service") -> aio.Channel:
        """A channel presenting a certificate of ``name`` issued by the mesh's CA (the plain
        test channel when the mesh runs without TLS)."""
        if not self.settings.tls.enabled:
            return self.channel
        if (name, kind) in self._as:
            return self._as[(name, kind)]
        ca = Authority(tls.certs_dir(self.settings), self.settings.tls.trust_domain)
        credentials = ca.channel_credentials(name, kind)
        channel = aio.secure_channel(self.server.address, credentials)
        self.extra_channels.append(channel)
        self._as[(name, kind)] = channel
        return channel

    @property
    def auth(self) -> auth_pb2_grpc.AuthServiceStub:
        return auth_pb2_grpc.AuthServiceStub(self.channel)

    @property
    def user(self) -> user_pb2_grpc.UserServiceStub:
        return user_pb2_grpc.UserServiceStub(self.channel)

    @property
    def mail_dir(self) -> Path:
        return Path(self.settings.var_dir) / "mail"

    async def register(
        self, email: str | None = None, password: str = PASSWORD, name: str = "Test User"
    ) -> auth_pb2.RegisterResponse:
        """Registers an account; ADMIN_EMAIL's is then made admin (see ``make_admin``)."""
        email = email or f"user-{uuid.uuid4().hex[:10]}@example.com"
        response: auth_pb2.RegisterResponse = await self.auth.Register(
            auth_pb2.RegisterRequest(
                email=email, password=password, display_name=name, accepted_terms=True
            )
        )
        if email == ADMIN_EMAIL:
            return await self.make_admin(email, password)
        return response

    async def promote(self, email: str, role: str) -> None:
        """What `learnmesh users promote EMAIL --role ROLE` does, on this mesh's database."""
        await cli.promote(self.settings, email, role)

    async def make_admin(self, email: str, password: str = PASSWORD) -> auth_pb2.RegisterResponse:
        """Promotes the account to admin as an operator would, then signs in again: roles
        reach access tokens at sign-in and refresh. Answers like Register, with the new
        tokens."""
        await self.promote(email, "admin")
        login = await self.auth.Login(auth_pb2.LoginRequest(email=email, password=password))
        return auth_pb2.RegisterResponse(
            user=login.user,
            access_token=login.access_token,
            refresh_token=login.refresh_token,
            expires_in=login.expires_in,
            token_type=login.token_type,
        )


@asynccontextmanager
async def running_mesh(
    settings: config.Settings, services: Sequence[str] = ("auth", "user"), bus: Bus | None = None
) -> AsyncIterator[Mesh]:
    """Starts ``services`` in this process on an ephemeral port, as `learnmesh up` does
    (mTLS when settings.tls.enabled); stops them afterwards. ``bus`` (not started) replaces
    the one the settings choose, e.g. a JetStream bus on a stream of the test's own: the
    services' events and the revocation feed all ride on it."""
    runtime, credentials = build_runtime(settings, "mesh")
    if bus is not None:
        runtime.bus = bus
    server = await start_server(
        runtime,
        [definition(name) for name in services],
        host="127.0.0.1",
        port=0,
        credentials=credentials,
        bus=bus,
    )
    mesh = Mesh(server, runtime, aio.insecure_channel(server.address), settings)
    if credentials is not None:
        await mesh.channel.close()
        mesh.channel = mesh.channel_as("tests", kind="client")
        mesh.extra_channels.remove(mesh.channel)
    try:
        yield mesh
    finally:
        for channel in [mesh.channel, *mesh.extra_channels]:
            await channel.close()
        await server.stop(0)
        await runtime.close()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying an access token."""
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
async def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    """The auth and user services on SQLite, then on PostgreSQL (shared by a test module)."""
    tmp = tmp_path_factory.mktemp(f"mesh-{request.param}")
    async with (
        scratch_database(request.param, tmp) as url,
        running_mesh(mesh_settings(tmp, url)) as m,
    ):
        yield m
