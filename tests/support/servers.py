"""Test servers as the product builds them: the product's server chain (all of it, or some
of its links in its order) in front of test doubles, on an ephemeral port."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2_grpc
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from interceptors.chain import ServerChain
from interceptors.link import ServerLink
from interceptors.ratelimit import Backend
from learnmesh import config
from learnmesh.auth.v1 import auth_pb2_grpc
from learnmesh.course.v1 import course_pb2_grpc
from learnmesh.file.v1 import file_pb2_grpc
from learnmesh.kernel.tokens import JwksFetch
from learnmesh.server import server_links


async def no_keys() -> list[dict[str, str]]:
    """A JWK Set with no key: every access token is refused (public methods still work)."""
    return []


def chain_links(
    *only: type[ServerLink],
    settings: config.Settings | None = None,
    jwks: JwksFetch = no_keys,
    jwks_min_refetch: float = 1.0,
    registry: CollectorRegistry | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    rate_limit_backend: Backend | None = None,
    tls: bool = False,
    extra: ServerLink | None = None,
    before: type[ServerLink] | None = None,
) -> list[ServerLink]:
    """The product's server chain (``learnmesh.server.server_links``), only the links of the
    types in ``only`` when some are named, with the default settings unless given; a
    test-only ``extra`` link goes just before the chain's link of type ``before``."""
    links = server_links(
        None,
        {},
        tls=tls,
        settings=settings or config.load(env={}),
        jwks=jwks,
        jwks_min_refetch=jwks_min_refetch,
        registry=registry,
        tracer_provider=tracer_provider,
        rate_limit_backend=rate_limit_backend,
        only=only or None,
    )
    if (extra is None) != (before is None):
        raise ValueError("an extra link needs the link it goes before, and only then")
    if extra is None:
        return links
    kinds = [type(link) for link in links]
    if before not in kinds:
        raise ValueError(f"{before} is not in this chain: {kinds}")
    at = kinds.index(before)
    return [*links[:at], extra, *links[at:]]


@dataclass
class Served:
    server: aio.Server
    port: int
    links: Sequence[ServerLink] = ()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """Stops the server, then closes what its links hold (as MeshServer.stop does)."""
        await self.server.stop(0)
        for link in self.links:
            close = getattr(link, "aclose", None)
            if close is not None:
                await close()


async def serve(
    links: Sequence[ServerLink],
    *,
    course: course_pb2_grpc.CourseServiceServicer | None = None,
    files: file_pb2_grpc.FileServiceServicer | None = None,
    auth: auth_pb2_grpc.AuthServiceServicer | None = None,
    with_health: bool = False,
    credentials: grpc.ServerCredentials | None = None,
) -> Served:
    """A real server on an ephemeral port with the given server chain and doubles (and the
    standard health service when ``with_health``), wired as the product wires it
    (``ServerChain(links).applied_to(server)``)."""
    server = aio.server()
    chained = ServerChain(links).applied_to(server)
    if course is not None:
        course_pb2_grpc.add_CourseServiceServicer_to_server(course, chained)
    if files is not None:
        file_pb2_grpc.add_FileServiceServicer_to_server(files, chained)
    if auth is not None:
        auth_pb2_grpc.add_AuthServiceServicer_to_server(auth, chained)
    if with_health:
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), chained)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return Served(server, port, links)
