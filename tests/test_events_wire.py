"""The event backbone wired into the mesh (learnmesh.server.start_server): the process's bus,
each service's relay and consumers, and what the auth service does with ``user.deleted`` —
over real mTLS calls, on SQLite and PostgreSQL, with the in-process bus and NATS JetStream."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from learnmesh.auth.v1 import auth_pb2
from learnmesh.eventing import consumer as consumer_module
from learnmesh.eventing.handlers import Handlers
from learnmesh.eventing.jetstream import JetStreamBus
from learnmesh.events.v1 import events_pb2
from learnmesh.server import build_runtime, start_server
from learnmesh.service import definition
from learnmesh.user.v1 import user_pb2
from tests.conftest import PASSWORD, Mesh, bearer, mesh_settings, running_mesh, scratch_database
from tests.support.eventing import NATS_URL, mesh_bus, require_nats
from tests.support.mesh import audit_events, data_of, new_email, outbox_events, wait_until
from tests.support.processes import server_process
from tests.support.status import refused

READY = re.compile(r"^ready")
ADMIN_PORT = re.compile(r"admin: .* plaintext 127\.0\.0\.1:(\d+)")
# What the auth service keeps of an account, by table and the column naming its user.
ACCOUNT_TABLES = {
    "auth_credentials": "user_id",
    "auth_sessions": "user_id",
    "auth_mfa": "user_id",
    "auth_mfa_recovery_codes": "user_id",
    "auth_password_resets": "user_id",
}


@asynccontextmanager
async def mesh_on(backend: str, bus_kind: str, tmp: Path) -> AsyncIterator[Mesh]:
    async with (
        scratch_database(backend, tmp) as url,
        mesh_bus(bus_kind) as bus,
        running_mesh(mesh_settings(tmp, url), bus=bus) as mesh,
    ):
        yield mesh


async def rows_of(mesh: Mesh, user_id: str) -> dict[str, int]:
    counts = {}
    async with mesh.runtime.db.transaction() as session:
        for table, column in ACCOUNT_TABLES.items():
            query = text(f"SELECT count(*) FROM {table} WHERE {column} = :u")
            counts[table] = int(await session.scalar(query, {"u": user_id}) or 0)
        tokens = text(
            "SELECT count(*) FROM auth_refresh_tokens WHERE session_id IN "
            "(SELECT id FROM auth_sessions WHERE user_id = :u)"
        )
        counts["auth_refresh_tokens"] = int(await session.scalar(tokens, {"u": user_id}) or 0)
    return counts


async def processed(mesh: Mesh, event_id: str) -> bool:
    query = text("SELECT count(*) FROM auth_processed_events WHERE event_id = :e")
    async with mesh.runtime.db.transaction() as session:
        return bool(await session.scalar(query, {"e": event_id}))


@pytest.mark.parametrize("bus_kind", ["memory", "jetstream"])
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_register_delete_register_again_with_the_same_email(
    backend: str, bus_kind: str, tmp_path: Path
) -> None:
    async with mesh_on(backend, bus_kind, tmp_path) as mesh:
        email = new_email("again")
        first = await mesh.register(email)
        old_id = first.user.id
        await mesh.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
        assert (await rows_of(mesh, old_id))["auth_sessions"] == 2
        # Taken while the account exists.
        await refused(mesh.register(email), grpc.StatusCode.ALREADY_EXISTS)

        await mesh.user.DeleteUser(
            user_pb2.DeleteUserRequest(user_id=old_id), metadata=bearer(first.access_token)
        )
        (deleted,) = [
            e for e in await outbox_events(mesh, "user", old_id) if e.type == "user.deleted"
        ]

        async def applied() -> bool:
            return await processed(mesh, deleted.id)

        await wait_until(applied)
        assert set((await rows_of(mesh, old_id)).values()) == {0}
        # The audit trail stays, and says what happened.
        trail = [event for event, _ in await audit_events(mesh, old_id)]
        assert "account.registered" in trail and trail[-1] == "account.forgotten"
        revoked = data_of(
            (await outbox_events(mesh, "auth", old_id))[-1], events_pb2.SessionRevoked
        )
        assert (revoked.all_sessions, revoked.reason, list(revoked.session_ids)) == (
            True,
            "user_deleted",
            [],
        )
        ttl = mesh.settings.auth.access_token_ttl
        assert revoked.expires_at.ToDatetime(tzinfo=UTC) > datetime.now(UTC) + timedelta(
            seconds=ttl - 30
        )
        # The old session's refresh token is gone with it.
        await refused(
            mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token=first.refresh_token)),
            grpc.StatusCode.UNAUTHENTICATED,
        )

        again = await mesh.register(email, password=PASSWORD + " two")
        assert again.user.id != old_id and again.user.email == email
        await mesh.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD + " two"))
        await refused(
            mesh.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD)),
            grpc.StatusCode.UNAUTHENTICATED,
        )

        # The old user.deleted delivered once more (a replay: new bus message, same event)
        # changes nothing, least of all the new account of that email.
        async with mesh.runtime.db.transaction() as session:
            payload = await session.scalar(
                text("SELECT payload FROM user_outbox WHERE id = :e"), {"e": deleted.id}
            )
        bus = mesh.runtime.bus
        await bus.publish(
            bus.subject_for("user.deleted"), bytes(payload), f"{deleted.id}.again", old_id
        )
        await asyncio.sleep(1.0)
        assert (await rows_of(mesh, again.user.id))["auth_credentials"] == 1
        await mesh.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD + " two"))


async def test_a_user_deleted_of_an_unknown_user_is_applied_as_nothing(tmp_path: Path) -> None:
    """A hostile or stale event (no such account, an id that is no UUID) deletes nothing
    and is still recorded as processed, not retried for ever."""
    async with mesh_on("sqlite", "memory", tmp_path) as mesh:
        kept = await mesh.register(new_email("kept"))
        before = await rows_of(mesh, kept.user.id)
        for user_id in ("no-such-user", "' OR 1=1 --", ""):
            event = events_pb2.Event(id=str(uuid.uuid4()), type="user.deleted", subject=user_id)
            event.data.Pack(events_pb2.UserDeleted(user_id=user_id))
            bus = mesh.runtime.bus
            await bus.publish(
                bus.subject_for("user.deleted"), event.SerializeToString(), event.id, user_id
            )

            async def applied(event_id: str = event.id) -> bool:
                return await processed(mesh, event_id)

            await wait_until(applied)
        assert await rows_of(mesh, kept.user.id) == before
        await mesh.auth.Login(auth_pb2.LoginRequest(email=kept.user.email, password=PASSWORD))


async def test_one_trace_holds_register_and_the_consumer_of_user_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # The links and the consumers trace to the global provider: this one, for the test.
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    monkeypatch.setattr(consumer_module, "tracer", provider.get_tracer("learnmesh.eventing"))

    seen: list[events_pb2.Event] = []
    watcher = Handlers("tests.trace")

    @watcher.on("user.created", events_pb2.UserCreated)
    async def on_created(
        session: AsyncSession, event: events_pb2.Event, data: events_pb2.UserCreated
    ) -> None:
        seen.append(event)

    # The user service as the product defines it, consuming user.created as well.
    user = dataclasses.replace(definition("user"), consumes=lambda _servicer: watcher)
    async with scratch_database("sqlite", tmp_path) as url:
        settings = mesh_settings(tmp_path, url)
        runtime, credentials = build_runtime(settings, "mesh")
        server = await start_server(
            runtime, [definition("auth"), user], host="127.0.0.1", port=0, credentials=credentials
        )
        mesh = Mesh(server, runtime, grpc.aio.insecure_channel(server.address), settings)
        mesh.channel = mesh.channel_as("tests", kind="client")
        try:
            registered = await mesh.register(new_email("traced"))

            async def consumed() -> bool:
                return bool(seen)

            await wait_until(consumed)
        finally:
            for channel in mesh.extra_channels:
                await channel.close()
            await server.stop(0)
            await runtime.close()
    spans = exporter.get_finished_spans()
    (register,) = [s for s in spans if s.name.endswith("AuthService/Register")]
    (create_user,) = [
        s for s in spans if s.name.endswith("UserService/CreateUser") and s.kind.name == "SERVER"
    ]
    (process,) = [s for s in spans if s.name == "user.created process"]
    trace_id = register.context.trace_id
    assert create_user.context.trace_id == trace_id
    assert process.context.trace_id == trace_id  # the producer's trace, on the consumer
    assert process.parent is not None and process.parent.span_id == create_user.context.span_id
    assert process.kind.name == "CONSUMER"
    assert seen[0].subject == registered.user.id


async def test_readyz_reports_the_bus(tmp_path: Path) -> None:
    """`learnmesh up`'s /readyz names the bus among its checks; JetStream out of reach
    fails the check."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEARNMESH_")}
    env.update(
        LEARNMESH_VAR_DIR=str(tmp_path), LEARNMESH_SERVER_ADMIN_PORT="0", LEARNMESH_SERVER_PORT="0"
    )
    command = [sys.executable, "-m", "learnmesh.cli", "up", "--insecure"]
    async with server_process(
        command, env=env, ready=READY, port=ADMIN_PORT, merge_stderr=True
    ) as up:
        url = f"http://127.0.0.1:{up.port}/readyz"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        assert json.loads(body)["checks"] == {"database": "ok", "bus": "ok"}
        await up.stop()
    await require_nats()
    unique = uuid.uuid4().hex[:10]
    # Subjects of its own: a LEARNMESH_EVENTS stream already on the server holds the
    # default ones, and NATS refuses a second stream over them.
    bus = JetStreamBus(NATS_URL, stream=f"TEST_{unique}", subject_prefix=f"test.{unique}.events")
    await bus.start()
    try:
        await bus.ping()
    finally:
        await bus.delete_stream()
        await bus.close()
    with pytest.raises(ConnectionError):
        await bus.ping()  # closed: what /readyz reports as the bus failing


@pytest.mark.parametrize("bus_kind", ["memory", "jetstream"])
async def test_close_stops_consumers_relays_and_the_bus_before_the_database(
    bus_kind: str, tmp_path: Path
) -> None:
    async with mesh_on("sqlite", bus_kind, tmp_path) as mesh:
        work = mesh.server.events
        assert work is not None
        assert len(work.relays) == 2 and len(work.consumers) == 2  # auth and user: both consume
        tasks = [each.task for each in [*work.relays, *work.consumers]]
        await mesh.server.stop(0)
        # Each ended its step and returned: none was cancelled halfway.
        assert all(task.done() and not task.cancelled() for task in tasks)
        assert work.relays == [] and work.consumers == []
        bus: Any = mesh.runtime.bus
        if bus_kind == "jetstream":
            assert bus._nc is None  # closed
        await mesh.runtime.db.ping()  # still open: the runtime closes it after


async def test_a_bus_that_cannot_start_stops_the_start(tmp_path: Path) -> None:
    async with scratch_database("sqlite", tmp_path) as url:
        settings = dataclasses.replace(mesh_settings(tmp_path, url), bus_url="nats://127.0.0.1:1")
        runtime, credentials = build_runtime(settings, "mesh")
        assert isinstance(runtime.bus, JetStreamBus)
        runtime.bus.connect_timeout = 1
        try:
            with pytest.raises(ConnectionError, match="NATS JetStream"):
                await start_server(
                    runtime,
                    [definition("auth"), definition("user")],
                    host="127.0.0.1",
                    port=0,
                    credentials=credentials,
                )
        finally:
            await runtime.close()


@pytest.mark.parametrize(("backend", "bus_kind"), [("sqlite", "memory"), ("postgres", "jetstream")])
async def test_concurrent_deletions_are_each_applied_once(
    backend: str, bus_kind: str, tmp_path: Path
) -> None:
    async with mesh_on(backend, bus_kind, tmp_path) as mesh:
        emails = [new_email(f"many{i}") for i in range(8)]
        accounts = await asyncio.gather(*(mesh.register(e) for e in emails))
        await asyncio.gather(
            *(
                mesh.user.DeleteUser(
                    user_pb2.DeleteUserRequest(user_id=a.user.id), metadata=bearer(a.access_token)
                )
                for a in accounts
            )
        )

        async def all_forgotten() -> bool:
            counts = await asyncio.gather(*(rows_of(mesh, a.user.id) for a in accounts))
            return all(set(c.values()) == {0} for c in counts)

        await wait_until(all_forgotten)
        again = await asyncio.gather(*(mesh.register(e) for e in emails))
        assert {a.user.email for a in again} == set(emails)
        async with mesh.runtime.db.transaction() as session:
            forgotten = await session.scalar(
                text("SELECT count(*) FROM auth_audit WHERE event = 'account.forgotten'")
            )
            applied = await session.scalar(text("SELECT count(*) FROM auth_processed_events"))
        assert (forgotten, applied) == (len(emails), len(emails))
