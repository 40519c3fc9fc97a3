"""The whole server chain at once, on unary and streaming RPCs, and the pieces of it that
need a real key rotation or several backends.

The chain here is the product's (learnmesh.server.server_links, through
tests.support.servers.chain_links) around test doubles of course and file services, with
access tokens signed by a key the test controls.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from grpc import aio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from interceptors.deadline import Deadline
from interceptors.errors import ErrorMapping
from interceptors.link import ServerLink
from interceptors.ratelimit import MemoryBackend, RateLimit, RedisBackend
from interceptors.request_id import RequestId
from interceptors.tracing import Tracing
from interceptors.validation import Validation
from learnmesh import config
from learnmesh.client import ClientFactory
from learnmesh.course.v1 import course_pb2, course_pb2_grpc
from learnmesh.file.v1 import file_pb2, file_pb2_grpc
from tests.support.doubles import COURSE_ID, CourseDouble, FileDouble
from tests.support.principal import MetadataPrincipal
from tests.support.servers import chain_links, serve
from tests.support.status import violations


class Keys:
    """An ES256 signing key set the test can rotate; the JWKS the verifier fetches."""

    def __init__(self) -> None:
        self.keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        self.fetches = 0
        self.rotate()

    def rotate(self) -> str:
        kid = uuid.uuid4().hex
        self.keys[kid] = ec.generate_private_key(ec.SECP256R1())
        self.active = kid
        return kid

    async def fetch(self) -> list[dict[str, Any]]:
        self.fetches += 1
        found = []
        for kid, key in self.keys.items():
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
            found.append({**jwk, "kid": kid, "alg": "ES256", "use": "sig"})
        return found

    def token(self, subject: str = "u-1", kid: str | None = None, **claims: Any) -> str:
        kid = kid or self.active
        now = int(time.time())
        body = {
            "iss": "learnmesh",
            "aud": "learnmesh",
            "sub": subject,
            "iat": now,
            "exp": now + 600,
            "jti": uuid.uuid4().hex,
            "roles": ["free_user"],
            "tier": "free",
            **claims,
        }
        return jwt.encode(body, self.keys[kid], algorithm="ES256", headers={"kid": kid})


@pytest.fixture
async def full() -> AsyncIterator[tuple[Keys, CollectorRegistry, str]]:
    keys, registry = Keys(), CollectorRegistry()
    links = chain_links(jwks=keys.fetch, jwks_min_refetch=MIN_REFETCH, registry=registry)
    served = await serve(links, course=CourseDouble(), files=FileDouble())
    yield keys, registry, served.address
    await served.stop()


MIN_REFETCH = 0.5


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"), ("x-request-id", "chain-test"))


async def test_streams_pass_through_every_link(
    full: tuple[Keys, CollectorRegistry, str],
) -> None:
    keys, registry, address = full
    async with aio.insecure_channel(address) as channel:
        files = file_pb2_grpc.FileServiceStub(channel)

        async def upload() -> AsyncIterator[file_pb2.UploadRequest]:
            yield file_pb2.UploadRequest(
                header=file_pb2.UploadHeader(
                    filename="a.png",
                    content_type="image/png",
                    size=8,
                    purpose=file_pb2.PURPOSE_AVATAR,
                )
            )
            yield file_pb2.UploadRequest(chunk=b"12345678")

        call = files.Upload(upload(), metadata=auth(keys.token()))
        reply = await call
        assert reply.file.size == 8
        trailers = dict(await call.trailing_metadata())
        assert trailers["x-request-id"] == "chain-test"  # request id link
        assert "x-ratelimit-remaining" in trailers  # rate limit link

        owner_only = files.Download(
            file_pb2.DownloadRequest(file_id=COURSE_ID), metadata=auth(keys.token())
        )
        with pytest.raises(aio.AioRpcError) as err:  # ACCESS_OWNER, and the caller is not
            async for _ in owner_only:
                pass
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

        admin = keys.token(roles=["admin"])
        chunks = [
            m.chunk
            async for m in files.Download(
                file_pb2.DownloadRequest(file_id=COURSE_ID), metadata=auth(admin)
            )
        ]
        assert chunks == [b"\x00" * 4, b"\x01" * 4, b"\x02" * 4]

        with pytest.raises(aio.AioRpcError) as err:  # anonymous
            await files.Upload(upload())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        async def bad_stream() -> AsyncIterator[file_pb2.UploadRequest]:
            yield file_pb2.UploadRequest(chunk=b"x" * (1024 * 1024 + 1))  # over the chunk limit

        with pytest.raises(aio.AioRpcError) as err:  # validation of a streamed message
            await files.Upload(bad_stream(), metadata=auth(keys.token()))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(violations(err.value)) == ["chunk"]

    def count(method: str, code: str) -> float:
        value = registry.get_sample_value(
            "grpc_server_handled_total",
            {
                "grpc_type": "client_stream" if method == "Upload" else "server_stream",
                "grpc_service": "learnmesh.file.v1.FileService",
                "grpc_method": method,
                "grpc_code": code,
            },
        )
        return value or 0.0

    assert count("Upload", "OK") == 1 and count("Upload", "Unauthenticated") == 1
    assert count("Upload", "InvalidArgument") == 1
    assert count("Download", "OK") == 1 and count("Download", "PermissionDenied") == 1


async def test_key_rotation_needs_no_restart_and_unknown_kids_cannot_flood_the_jwks(
    full: tuple[Keys, CollectorRegistry, str],
) -> None:
    keys, _, address = full
    enroll = course_pb2.EnrollRequest(course_id=COURSE_ID)
    async with aio.insecure_channel(address) as channel:
        courses = course_pb2_grpc.CourseServiceStub(channel)
        await courses.Enroll(enroll, metadata=auth(keys.token()))
        assert keys.fetches == 1

        await asyncio.sleep(MIN_REFETCH)
        keys.rotate()  # the auth service starts signing with a new key
        await courses.Enroll(enroll, metadata=auth(keys.token()))
        assert keys.fetches == 2, "an unknown kid refetches the JWKS"

        forged = ec.generate_private_key(ec.SECP256R1())
        started = time.monotonic()
        for _ in range(40):  # random kids: at most one refetch per min_refetch seconds
            token = jwt.encode(
                {
                    "sub": "x",
                    "iss": "learnmesh",
                    "aud": "learnmesh",
                    "exp": 2**31,
                    "iat": 0,
                    "jti": "j",
                },
                forged,
                algorithm="ES256",
                headers={"kid": uuid.uuid4().hex},
            )
            with pytest.raises(aio.AioRpcError) as err:
                await courses.Enroll(enroll, metadata=auth(token))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        allowed = 2 + int((time.monotonic() - started) / MIN_REFETCH) + 1
        assert keys.fetches <= allowed, f"{keys.fetches} JWKS fetches for 40 forged tokens"


async def test_round_robin_over_several_addresses() -> None:
    doubles = [CourseDouble(), CourseDouble()]
    served = [await serve([], course=d) for d in doubles]
    base = config.load(env={})
    settings = replace(base, course_address=",".join(s.address for s in served))
    clients = ClientFactory(settings)
    try:
        for _ in range(20):
            await clients.stub("course").GetCourse(
                course_pb2.GetCourseRequest(course_id=COURSE_ID), timeout=5
            )
        calls = [d.script.calls for d in doubles]
        # Round robin once both subchannels are ready (the first calls may find one still
        # connecting): both serve, about evenly.
        assert sum(calls) == 20 and min(calls) >= 7, calls
    finally:
        await clients.close()
        for s in served:
            await s.stop()


def test_a_part_of_the_chain_keeps_the_chains_order() -> None:
    part = chain_links(Validation, RequestId, Deadline)
    assert [type(link) for link in part] == [RequestId, Deadline, Validation]
    assert [type(link) for link in chain_links(Validation)] == [Validation]
    with pytest.raises(ValueError, match="not links of the server chain"):
        chain_links(ServerLink)


def test_a_test_link_goes_just_before_the_link_named_and_nowhere_else() -> None:
    extra = MetadataPrincipal()
    part = chain_links(RequestId, ErrorMapping, RateLimit, extra=extra, before=RateLimit)
    assert [type(link) for link in part] == [RequestId, ErrorMapping, MetadataPrincipal, RateLimit]
    assert part[2] is extra
    whole = chain_links(extra=extra, before=RequestId)
    assert whole[0] is extra and len(whole) == len(chain_links()) + 1
    with pytest.raises(ValueError, match="is not in this chain"):
        chain_links(RequestId, ErrorMapping, extra=extra, before=RateLimit)
    with pytest.raises(ValueError, match="needs the link it goes before"):
        chain_links(extra=extra)
    with pytest.raises(ValueError, match="needs the link it goes before"):
        chain_links(before=RateLimit)


def test_the_tracer_provider_and_rate_limit_backend_given_are_the_links_own() -> None:
    provider, exporter = TracerProvider(), InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    backend = MemoryBackend()  # empty, so falsy (it has a length): given all the same
    tracing, limit = chain_links(
        Tracing, RateLimit, tracer_provider=provider, rate_limit_backend=backend
    )
    assert isinstance(tracing, Tracing) and isinstance(limit, RateLimit)
    tracing.starter.tracer.start_span("from the link's tracer").end()
    assert [span.name for span in exporter.get_finished_spans()] == ["from the link's tracer"]
    assert limit.backend is backend
    # Without one, the backend follows the settings: Redis when a URL is set.
    settings = config.load(
        env={"LEARNMESH_REDIS_URL": "redis://127.0.0.1:1/0", "LEARNMESH_LIMITS_REDIS_PREFIX": "p:"}
    )
    (from_settings,) = chain_links(RateLimit, settings=settings)
    assert isinstance(from_settings, RateLimit)
    assert isinstance(from_settings.backend, RedisBackend)
    (default,) = chain_links(RateLimit)
    assert isinstance(default, RateLimit) and isinstance(default.backend, MemoryBackend)
    provider.shutdown()
