"""The server factory: services, health, reflection and the server chain on one port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from prometheus_client import CollectorRegistry
from sqlalchemy import MetaData

from interceptors.auth import AccessPolicy
from interceptors.chain import ServerChain
from interceptors.deadline import Deadline
from interceptors.errors import ErrorMapping
from interceptors.identity import PeerIdentity, mesh_service_prefix
from interceptors.link import ServerLink
from interceptors.metrics import Metrics
from interceptors.ratelimit import Backend, RateLimit, backend_for
from interceptors.request_id import RequestId
from interceptors.tracing import Tracing
from interceptors.validation import Validation
from learnmesh import reflection, tls
from learnmesh.audit import RefusalTrail, audit_table
from learnmesh.auth.v1 import auth_pb2
from learnmesh.client import ClientFactory
from learnmesh.config import Settings
from learnmesh.db import Database
from learnmesh.eventing.bus import Bus
from learnmesh.eventing.tables import event_tables
from learnmesh.eventing.wiring import make_bus, make_consumer, make_relay
from learnmesh.kernel.refusals import RefusalHook
from learnmesh.kernel.revocations import RevocationList
from learnmesh.kernel.tokens import JwksCache, JwksFetch, TokenVerifier
from learnmesh.revocation import RevocationFeed, start_revocation_feed
from learnmesh.service import IMPLEMENTED, Runtime, ServiceDefinition

log = logging.getLogger("learnmesh.server")


def build_runtime(
    settings: Settings, identity: str
) -> tuple[Runtime, grpc.ServerCredentials | None]:
    """The process runtime, and server credentials when mTLS is on (``identity`` names the
    certificate the server presents; each service's outbound calls present its own)."""
    db = Database(settings.database)
    bus = make_bus(settings)
    if not settings.tls.enabled:
        return Runtime(settings, db, ClientFactory(settings), bus), None
    runtime = Runtime(
        settings,
        db,
        ClientFactory(settings, credentials=tls.channel_credentials(settings, identity)),
        bus,
        identity=lambda name: tls.channel_credentials(settings, name),
    )
    return runtime, tls.server_credentials(settings, identity)


def jwks_fetcher(runtime: Runtime) -> JwksFetch:
    """Fetches the JWK Set from the auth service through the client factory."""

    async def fetch() -> list[dict[str, str]]:
        response = await runtime.clients.stub("auth").GetJwks(auth_pb2.GetJwksRequest(), timeout=5)
        return [
            {f.name: v for f, v in key.ListFields()}  # kty, crv, x, y, kid, alg, use
            for key in response.keys
        ]

    return fetch


def refusal_trail(runtime: Runtime, definitions: Sequence[ServiceDefinition]) -> RefusalTrail:
    """Where the chain's refusals go: the audit table of the service owning the refused
    method, in that service's database (one process's services share ``runtime.db``)."""
    tables = {
        d.full_name: audit_table(d.audit_table, MetaData()) for d in definitions if d.audit_table
    }
    auth = runtime.settings.auth
    return RefusalTrail(
        runtime.db,
        tables,
        window=auth.refusal_audit_window,
        capacity=auth.refusal_audit_capacity,
    )


def server_links(
    runtime: Runtime | None,
    owner_resolvers: dict[str, Any],
    *,
    tls: bool,
    settings: Settings | None = None,
    jwks: JwksFetch | None = None,
    jwks_min_refetch: float = 1.0,
    registry: CollectorRegistry | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    rate_limit_backend: Backend | None = None,
    only: Collection[type[ServerLink]] | None = None,
    on_refusal: RefusalHook | None = None,
    revocations: RevocationList | None = None,
) -> list[ServerLink]:
    """The server chain, outermost first (ARCHITECTURE.md, "Call path"): the one place its
    order is written.

    ``settings`` default to the runtime's; ``jwks`` fetches the keys access tokens are
    verified with (default: the auth service's, through the runtime's clients). Tests and
    measurements outside a process pass no runtime and both of those. ``registry`` takes
    the call metrics (the process's default when None), ``tracer_provider`` the spans (the
    global provider when None), and ``rate_limit_backend`` the rate-limit counters (when
    None, Redis at ``settings.redis_url`` if set, else memory): tests give their own, to
    read what was recorded or to move the clock. ``only`` keeps the links of those
    types alone, in the same order, for tests and measurements of part of the chain; the
    others are not even built. ``on_refusal`` hears of every call the identity and auth
    links refuse. ``revocations`` are the revoked tokens the auth link refuses (default:
    the runtime's, else an empty list).
    """
    if runtime is not None:
        settings = runtime.settings if settings is None else settings
        jwks = jwks_fetcher(runtime) if jwks is None else jwks
        revocations = runtime.revocations if revocations is None else revocations
    if settings is None or jwks is None:
        raise ValueError("without a runtime, server_links needs settings and jwks")

    def access_policy() -> ServerLink:
        cache = JwksCache(jwks, min_refetch=jwks_min_refetch)
        verifier = TokenVerifier(
            cache, issuer=settings.auth.issuer, audience=settings.auth.audience
        )
        return AccessPolicy(
            verifier, owner_resolvers, on_refusal=on_refusal, revocations=revocations
        )

    makers: list[tuple[type[ServerLink], Callable[[], ServerLink]]] = [
        # Only mesh services may forward their end user's address (none without mTLS).
        (
            RequestId,
            lambda: RequestId(mesh_service_prefix(settings.tls.trust_domain) if tls else ""),
        ),
        (
            Tracing,
            lambda: Tracing(tracer_provider, sdk_spans=settings.telemetry.sdk_spans),
        ),
        (Metrics, lambda: Metrics(registry, access_log=settings.telemetry.access_log)),
        (ErrorMapping, ErrorMapping),
        (
            Deadline,
            lambda: Deadline(
                settings.deadlines.default, settings.deadlines.cap, settings.method_deadlines
            ),
        ),
        (
            PeerIdentity,
            lambda: PeerIdentity(
                settings.tls.trust_domain,
                tls=tls,
                extra_callers=settings.tls.callers,
                on_refusal=on_refusal,
            ),
        ),
        (AccessPolicy, access_policy),
        (
            RateLimit,
            lambda: RateLimit(
                settings.limits,
                backend_for(settings.redis_url, settings.limits.redis_prefix)
                if rate_limit_backend is None
                else rate_limit_backend,
            ),
        ),
        (Validation, Validation),
    ]
    if only is not None and not set(only) <= {kind for kind, _ in makers}:
        raise ValueError(f"not links of the server chain: {set(only) - {k for k, _ in makers}}")
    return [make() for kind, make in makers if only is None or kind in only]


# Seconds the relays and consumers get to end the step under way at stop; then cancelled.
EVENTS_STOP_SECONDS = 10.0


class _Stoppable(Protocol):
    def stop(self) -> None: ...


@dataclass
class _Running:
    """A relay or a consumer, and the task running it."""

    part: _Stoppable
    task: asyncio.Task[None]


@dataclass
class EventWork:
    """The relays and consumers a process runs for its services, on its one bus."""

    bus: Bus
    relays: list[_Running] = field(default_factory=list)
    consumers: list[_Running] = field(default_factory=list)

    @classmethod
    async def start(
        cls, runtime: Runtime, definitions: Sequence[ServiceDefinition], servicers: dict[str, Any]
    ) -> EventWork:
        """Starts the bus, then a relay per service with event tables and a consumer per
        group it consumes (the bus refusing to start stops the process's start)."""
        settings, db = runtime.settings, runtime.db
        if runtime.bus.volatile and {d.name for d in definitions} != set(IMPLEMENTED):
            log.warning(
                "the in-process bus carries events between the services of this process "
                "only; services in other processes need LEARNMESH_BUS_URL (NATS JetStream)"
            )
        await runtime.bus.start()
        work = cls(runtime.bus)
        for definition in definitions:
            if not definition.event_tables:
                continue
            tables = event_tables(definition.event_tables, MetaData())
            relay = make_relay(settings, db, tables.outbox, runtime.bus)
            work.relays.append(_running(relay, relay.run(), f"relay of {tables.outbox.name}"))
            handlers = definition.consumes(servicers[definition.name])
            if handlers is not None:
                consumer = make_consumer(settings, db, tables, runtime.bus, handlers)
                work.consumers.append(
                    _running(consumer, consumer.run(), f"consumer {handlers.group}")
                )
        return work

    async def stop_consumers(self) -> None:
        await _stop(self.consumers)

    async def stop_relays(self) -> None:
        await _stop(self.relays)


def _running(part: _Stoppable, work: Coroutine[Any, Any, None], name: str) -> _Running:
    """Runs ``work`` in a task; one that ends by itself with an error is logged."""
    task = asyncio.create_task(work, name=name)

    def ended(done: asyncio.Task[None]) -> None:
        if not done.cancelled() and done.exception() is not None:
            log.error("%s stopped", name, exc_info=done.exception())

    task.add_done_callback(ended)
    return _Running(part, task)


async def _stop(running: list[_Running]) -> None:
    """Asks each part to stop after its step under way (aiosqlite does not survive a query
    cancelled halfway), and cancels what is still running after EVENTS_STOP_SECONDS."""
    for each in running:
        each.part.stop()
    tasks = [each.task for each in running]
    if tasks:
        _, late = await asyncio.wait(tasks, timeout=EVENTS_STOP_SECONDS)
        for task in late:
            log.warning("%s did not stop in time; cancelled", task.get_name())
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    running.clear()


@dataclass
class MeshServer:
    """A started server and what it serves."""

    server: aio.Server
    health: health.aio.HealthServicer
    port: int
    host: str
    services: list[ServiceDefinition]
    servicers: dict[str, Any] = field(default_factory=dict)
    links: list[ServerLink] = field(default_factory=list)
    refusals: RefusalTrail | None = None
    events: EventWork | None = None
    revocation_feed: RevocationFeed | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def drain(self, grace: float | None = 5.0) -> None:
        """Stops accepting: health NOT_SERVING first (so probes and balancers turn away),
        then the server stops, giving in-flight calls ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    async def aclose(self) -> None:
        """Stops the consumers, closes the servicers, then the links (the reverse of their
        making), stops the relays and closes the bus; every part is closed even when one
        before it fails, and the first failure is raised. All before the runtime closes
        the database."""
        async with contextlib.AsyncExitStack() as parts:
            if self.refusals is not None:
                # Last, after the links that feed it, and before the runtime closes the
                # database it writes to.
                parts.push_async_callback(self.refusals.aclose)
            if self.events is not None:
                parts.push_async_callback(self.events.bus.close)
                # What is committed until here stays in the outbox for the next start.
                parts.push_async_callback(self.events.stop_relays)
            if self.revocation_feed is not None:
                parts.push_async_callback(self.revocation_feed.aclose)
            for part in [*self.links, *self.servicers.values()]:
                close = getattr(part, "aclose", None)
                if close is not None:
                    parts.push_async_callback(close)
            if self.events is not None:
                # First: no handler runs on a servicer being closed.
                parts.push_async_callback(self.events.stop_consumers)

    async def stop(self, grace: float | None = 5.0) -> None:
        await self.drain(grace)
        await self.aclose()


async def start_server(
    runtime: Runtime,
    definitions: Sequence[ServiceDefinition],
    *,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None = None,
    reuse_port: bool = False,
    bus: Bus | None = None,
) -> MeshServer:
    """Migrates, builds and starts ``definitions`` on ``host:port`` (0 picks a free port),
    with mTLS when ``credentials`` are given; starts the runtime's bus (``bus`` replaces it
    when given), the services' relays and consumers, and the revocation feed before health
    turns SERVING."""
    if bus is not None:
        runtime.bus = bus
    for definition in definitions:
        if definition.migrations is not None:
            await runtime.db.migrate(definition.name, definition.migrations)
    # Filled below, once the servicers exist; the access link reads it at call time.
    resolvers: dict[str, Any] = {}
    refusals = refusal_trail(runtime, definitions)
    links = server_links(
        runtime, resolvers, tls=credentials is not None, on_refusal=refusals.record
    )
    server = aio.server(
        options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_concurrent_streams", runtime.settings.server.max_concurrent_streams),
        ]
    )
    # Every service registers through the chain, health and reflection included.
    chained = ServerChain(links).applied_to(server)
    try:
        if credentials is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", credentials)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}: the address is in use or not local")
    if not runtime.clients.local_address:
        dial = "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host  # noqa: S104
        runtime.clients.local_address = f"{dial}:{bound}"
    servicers: dict[str, Any] = {}
    for definition in definitions:
        servicer = await definition.create(runtime.for_service(definition.name))
        servicers[definition.name] = servicer
        resolvers.update(definition.owner_resolvers(servicer))
        definition.add_to_server(servicer, chained)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, chained)
    names = [d.full_name for d in definitions]
    reflection.enable([*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name], chained)
    mesh = MeshServer(
        server, health_servicer, bound, host, list(definitions), servicers, links, refusals
    )
    try:
        mesh.events = await EventWork.start(runtime, definitions, servicers)
    except BaseException:
        await mesh.stop(0)
        raise
    # Revocations still in force are known before the first call (and before SERVING);
    # the feed rides on the process's bus, which the events' start has started.
    try:
        mesh.revocation_feed = await start_revocation_feed(
            runtime.bus, runtime.revocations, runtime.settings.auth.access_token_ttl
        )
    except BaseException:
        await mesh.stop(0)
        raise
    await server.start()
    refusals.start()
    for link in links:
        start = getattr(link, "start", None)
        if start is not None:
            start()  # e.g. the auth link fetching the signing keys before the first call
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return mesh
