"""The server factory: services, health, reflection and the server chain on one port."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from interceptors.auth import AccessPolicy, JwksCache, TokenVerifier
from interceptors.chain import ServerChain, ServerLink
from interceptors.errors import ErrorMapping
from interceptors.request_id import RequestId
from interceptors.validation import Validation
from learnmesh.auth.v1 import auth_pb2
from learnmesh.service import Runtime, ServiceDefinition

log = logging.getLogger("learnmesh.server")


def jwks_fetcher(runtime: Runtime) -> Any:
    """Fetches the JWK Set from the auth service through the client factory."""

    async def fetch() -> list[dict[str, str]]:
        response = await runtime.clients.stub("auth").GetJwks(auth_pb2.GetJwksRequest(), timeout=5)
        return [
            {f.name: v for f, v in key.ListFields()}  # kty, crv, x, y, kid, alg, use
            for key in response.keys
        ]

    return fetch


def server_links(runtime: Runtime, owner_resolvers: dict[str, Any]) -> list[ServerLink]:
    """The server chain, outermost first (ARCHITECTURE.md, "Call path")."""
    auth = runtime.settings.auth
    verifier = TokenVerifier(
        JwksCache(jwks_fetcher(runtime)), issuer=auth.issuer, audience=auth.audience
    )
    return [
        RequestId(),
        ErrorMapping(),
        AccessPolicy(verifier, owner_resolvers),
        Validation(),
    ]


@dataclass
class MeshServer:
    """A started server and what it serves."""

    server: aio.Server
    health: health.aio.HealthServicer
    port: int
    host: str
    services: list[ServiceDefinition]
    servicers: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def stop(self, grace: float | None = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for servicer in self.servicers.values():
            close = getattr(servicer, "aclose", None)
            if close is not None:
                await close()


async def start_server(
    runtime: Runtime,
    definitions: Sequence[ServiceDefinition],
    *,
    host: str,
    port: int,
    reuse_port: bool = False,
) -> MeshServer:
    """Migrates, builds and starts ``definitions`` on ``host:port`` (0 picks a free port)."""
    for definition in definitions:
        await runtime.db.migrate(definition.name, definition.migrations)
    servicers: dict[str, Any] = {}
    resolvers: dict[str, Any] = {}
    for definition in definitions:
        servicer = await definition.create(runtime)
        servicers[definition.name] = servicer
        resolvers.update(definition.owner_resolvers(servicer))
    server = aio.server(
        interceptors=[ServerChain(server_links(runtime, resolvers))],
        options=[("grpc.so_reuseport", 1 if reuse_port else 0)],
    )
    for definition in definitions:
        definition.add_to_server(servicers[definition.name], server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [d.full_name for d in definitions]
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}: the address is in use or not local")
    await server.start()
    if not runtime.clients.local_address:
        dial = "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host  # noqa: S104
        runtime.clients.local_address = f"{dial}:{bound}"
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return MeshServer(server, health_servicer, bound, host, list(definitions), servicers)
