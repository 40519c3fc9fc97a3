"""The gRPC metrics as dashboards read them: go-grpc-middleware's names, labels and counts.

Over the wire: a real server wired as the product wires it (``ServerChain(links)
.applied_to(server)``, health and reflection included) and the product's client factory,
calls of all four kinds ending in several codes, then the exposition of both sides holds
exactly those series. Against the library: the collector's text is what prometheus_client's
own Counter and Histogram expose for the same observations.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from interceptors.chain import ServerChain
from interceptors.deadline import Deadline
from interceptors.errors import ErrorMapping
from interceptors.method import RpcKind
from interceptors.metrics import BUCKETS, CODE_NAMES, GRPC_TYPES, Metrics, call_stats
from interceptors.metrics.collector import Side
from interceptors.request_id import RequestId
from interceptors.tracing import Tracing
from learnmesh import config, reflection
from learnmesh.admin import start_admin
from learnmesh.auth.v1 import auth_pb2
from learnmesh.client import ClientFactory
from learnmesh.course.v1 import course_pb2, course_pb2_grpc
from learnmesh.file.v1 import file_pb2, file_pb2_grpc
from tests.conftest import PASSWORD, mesh_settings, running_mesh, scratch_database
from tests.support.doubles import COURSE_ID, CourseDouble
from tests.support.servers import chain_links

AUTH = "learnmesh.auth.v1.AuthService"
COURSE = "learnmesh.course.v1.CourseService"
FILES = "learnmesh.file.v1.FileService"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
HEALTH = "grpc.health.v1.Health"
MISSING_ID = str(uuid.UUID(int=1))
SLOW_ID = str(uuid.UUID(int=2))
TAKEN = "taken.txt"
SIDES: tuple[Side, ...] = ("server", "client")

# Go's codes.Code.String() for every code, as go-grpc-middleware labels grpc_code.
GO_CODES = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
]


def test_label_values_are_go_grpc_middlewares() -> None:
    assert [CODE_NAMES[code] for code in sorted(grpc.StatusCode, key=lambda c: c.value[0])] == (
        GO_CODES
    )
    assert GRPC_TYPES == {
        "unary_unary": "unary",
        "stream_unary": "client_stream",
        "unary_stream": "server_stream",
        "stream_stream": "bidi_stream",
    }


# --- against prometheus_client ----------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One finished call as both sides would record it."""

    kind: RpcKind
    service: str
    method: str
    code: grpc.StatusCode
    seconds: float
    received: int = 1  # messages, where the direction streams
    sent: int = 1


class Reference:
    """The same families made of prometheus_client's own instruments."""

    def __init__(self, side: str, helps: tuple[str, ...]) -> None:
        self.side = side
        self.registry = CollectorRegistry()
        labels = ("grpc_type", "grpc_service", "grpc_method")
        prefix = f"grpc_{side}"
        started, handled, received, sent, seconds = helps
        self.started = Counter(f"{prefix}_started_total", started, labels, registry=self.registry)
        self.handled = Counter(
            f"{prefix}_handled_total", handled, (*labels, "grpc_code"), registry=self.registry
        )
        self.received = Counter(
            f"{prefix}_msg_received_total", received, labels, registry=self.registry
        )
        self.sent = Counter(f"{prefix}_msg_sent_total", sent, labels, registry=self.registry)
        self.seconds = Histogram(
            f"{prefix}_handling_seconds", seconds, labels, buckets=BUCKETS, registry=self.registry
        )

    def record(self, call: Call) -> None:
        labels = (GRPC_TYPES[call.kind], call.service, call.method)
        request_streams = call.kind.startswith("stream_")
        response_streams = call.kind.endswith("_stream")
        ok = call.code is grpc.StatusCode.OK
        # Requests travel client -> server, responses back; each side receives one of them.
        if self.side == "server":
            inbound, outbound = self.received, self.sent
        else:
            inbound, outbound = self.sent, self.received
        self.started.labels(*labels).inc()
        if request_streams:
            if call.received if self.side == "server" else call.sent:
                inbound.labels(*labels).inc(call.received if self.side == "server" else call.sent)
        else:
            inbound.labels(*labels).inc()  # the request, before the handler or invoker
        if response_streams:
            count = call.sent if self.side == "server" else call.received
            if count:
                outbound.labels(*labels).inc(count)
        elif not request_streams or ok:
            outbound.labels(*labels).inc()  # the response (unary: whatever the outcome)
        self.handled.labels(*labels, CODE_NAMES[call.code]).inc()
        self.seconds.labels(*labels).observe(call.seconds)

    def text(self) -> str:
        """The exposition without prometheus_client's ``_created`` gauges (Go's provider
        exposes none, nor does the collector)."""
        kept = [
            line
            for line in generate_latest(self.registry).decode().split("\n")
            if not _is_created(line)
        ]
        return "\n".join(kept)


def _is_created(line: str) -> bool:
    name = line.split(" ")[2] if line.startswith("#") else re.split(r"[{ ]", line, maxsplit=1)[0]
    return name.endswith("_created")


def record_ours(registry: CollectorRegistry, side: Side, call: Call) -> None:
    """What the links do for one call, straight on the collector."""
    stats = call_stats(registry, side)
    series = stats.series_for(call.kind, call.service, call.method)
    series.started += 1
    own_in, own_out = (call.received, call.sent) if side == "server" else (call.sent, call.received)
    if call.kind.startswith("stream_"):
        if side == "server":
            series.received += own_in
        else:
            series.sent += own_in
    if call.kind.endswith("_stream"):
        if side == "server":
            series.sent += own_out
        else:
            series.received += own_out
    elif call.kind == "stream_unary" and call.code is grpc.StatusCode.OK:
        if side == "server":
            series.sent += 1
        else:
            series.received += 1
    series.finish(call.code, call.seconds)


def both(side: Side, calls: list[Call]) -> tuple[str, str]:
    """(ours, prometheus_client's) exposition of ``calls``."""
    ours = CollectorRegistry()
    stats = call_stats(ours, side)
    reference = Reference(side, stats.helps)
    for call in calls:
        record_ours(ours, side, call)
        reference.record(call)
    return generate_latest(ours).decode(), reference.text()


SAMPLE_CALLS = [
    Call("unary_unary", COURSE, "GetCourse", grpc.StatusCode.OK, 0.0002),
    Call("unary_unary", COURSE, "GetCourse", grpc.StatusCode.NOT_FOUND, 0.0031),
    Call("unary_stream", FILES, "Download", grpc.StatusCode.OK, 0.02, sent=3, received=3),
    Call("stream_unary", FILES, "Upload", grpc.StatusCode.OK, 0.5, received=3, sent=3),
    Call("stream_stream", REFLECTION, "ServerReflectionInfo", grpc.StatusCode.OK, 1.0, 2, 2),
    Call("unary_unary", AUTH, "Login", grpc.StatusCode.UNAUTHENTICATED, 0.025),
    Call("unary_unary", COURSE, "GetCourse", grpc.StatusCode.OK, 31.0),  # past every bound
    Call("stream_unary", FILES, "Upload", grpc.StatusCode.ALREADY_EXISTS, 0.001, 1, 1),
    Call("unary_stream", FILES, "Download", grpc.StatusCode.CANCELLED, 0.005, 1, 1),
    Call("unary_unary", COURSE, "Enroll", grpc.StatusCode.DEADLINE_EXCEEDED, 10.0),
]


@pytest.mark.parametrize("side", SIDES)
def test_the_exposition_is_prometheus_clients_own_for_the_same_observations(side: Side) -> None:
    ours, reference = both(side, SAMPLE_CALLS)
    assert ours == reference
    # What dashboards query: the names and types go-grpc-middleware exposes.
    types = {f.name: f.type for f in text_string_to_metric_families(ours)}
    assert types == {
        f"grpc_{side}_started": "counter",
        f"grpc_{side}_handled": "counter",
        f"grpc_{side}_msg_received": "counter",
        f"grpc_{side}_msg_sent": "counter",
        f"grpc_{side}_handling_seconds": "histogram",
    }


def _by_family(text: str) -> list[list[str]]:
    """The exposition as families, each its comment lines then its samples sorted (series
    appear in first-use order, which differs between the two only in sample order)."""
    families: list[list[str]] = []
    for line in text.rstrip("\n").split("\n"):  # not splitlines: label text may hold \x1e
        if line.startswith("# HELP"):
            families.append([line])
        else:
            families[-1].append(line)
    return [[*f[:2], *sorted(f[2:])] for f in families]


names = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12)
calls = st.builds(
    Call,
    kind=st.sampled_from(list(GRPC_TYPES)),
    service=st.sampled_from([COURSE, FILES, 'evil"\\\n.Service']),
    method=names,
    code=st.sampled_from(list(grpc.StatusCode)),
    seconds=st.one_of(st.sampled_from(BUCKETS), st.floats(0, 100, allow_nan=False)),
    received=st.integers(0, 5),
    sent=st.integers(0, 5),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SIDES), st.lists(calls, max_size=25))
def test_any_observations_expose_as_prometheus_client_would(side: Side, made: list[Call]) -> None:
    ours, reference = both(side, made)
    assert _by_family(ours) == _by_family(reference)


# --- over the wire ------------------------------------------------------------------------------


class Files(file_pb2_grpc.FileServiceServicer):
    """Upload refuses the name TAKEN after its first message; Download of MISSING_ID fails
    before any message, of SLOW_ID stalls after the first."""

    async def Upload(self, request_iterator: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        size = 0
        async for message in request_iterator:
            if message.header.filename == TAKEN:
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, "the name is taken")
            size += len(message.chunk)
        return file_pb2.UploadResponse(file=file_pb2.FileInfo(id=COURSE_ID, size=size))

    async def Download(
        self, request: Any, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        if request.file_id == MISSING_ID:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such file")
        yield file_pb2.DownloadResponse(chunk=b"0")
        if request.file_id == SLOW_ID:
            await asyncio.sleep(30)
        yield file_pb2.DownloadResponse(chunk=b"1")
        yield file_pb2.DownloadResponse(chunk=b"2")


@dataclass
class Rig:
    server: aio.Server
    address: str
    clients: ClientFactory
    course: CourseDouble


@asynccontextmanager
async def metered(registry: CollectorRegistry) -> AsyncIterator[Rig]:
    """A server with the metrics link among the product's outer links (the access log off),
    health and reflection, and the client factory (the product's client chain) pointed at
    it."""
    server = aio.server()
    quiet = config.load(env={"LEARNMESH_TELEMETRY_ACCESS_LOG": "false"})
    links = chain_links(
        RequestId, Tracing, Metrics, ErrorMapping, Deadline, settings=quiet, registry=registry
    )
    chained = ServerChain(links).applied_to(server)
    course = CourseDouble()
    course_pb2_grpc.add_CourseServiceServicer_to_server(course, chained)
    file_pb2_grpc.add_FileServiceServicer_to_server(Files(), chained)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), chained)
    reflection.enable([COURSE, FILES, HEALTH], chained)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    clients = ClientFactory(config.load(env={}), local_address=address, metrics_registry=registry)
    try:
        yield Rig(server, address, clients, course)
    finally:
        await clients.close()
        await server.stop(0)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def grpc_samples(registry: CollectorRegistry) -> Samples:
    """Every grpc_* sample but buckets and sums (checked apart), by name and labels."""
    found: Samples = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name.startswith("grpc_") and not s.name.endswith(("_bucket", "_sum")):
                found[s.name, frozenset(s.labels.items())] = s.value
    return found


def expect(side: str, rows: list[tuple[str, str, str, dict[str, int]]]) -> Samples:
    """Samples of ``side`` from (grpc_type, service, method, {what: count}) rows; ``what``
    is started, received, sent or a Go code name (handled, and the histogram's count)."""
    found: Samples = {}
    for grpc_type, service, method, counts in rows:
        labels = {"grpc_type": grpc_type, "grpc_service": service, "grpc_method": method}
        key = frozenset(labels.items())
        handled = 0
        for what, count in counts.items():
            if what == "started":
                found[f"grpc_{side}_started_total", key] = count
            elif what in ("received", "sent"):
                found[f"grpc_{side}_msg_{what}_total", key] = count
            else:
                handled += count
                code_key = frozenset({**labels, "grpc_code": what}.items())
                found[f"grpc_{side}_handled_total", code_key] = count
        found[f"grpc_{side}_handling_seconds_count", key] = handled
    return found


async def settled(registry: CollectorRegistry, expected: Samples) -> Samples:
    """The samples once they equal ``expected`` (streams end a moment after the caller is
    done), or as they are after 5 s."""
    for _ in range(100):
        found = grpc_samples(registry)
        if found == expected:
            return found
        await asyncio.sleep(0.05)
    return grpc_samples(registry)


def get_course() -> course_pb2.GetCourseRequest:
    return course_pb2.GetCourseRequest(course_id=COURSE_ID)


def uploads(*, name: str = "notes.txt", chunks: int = 2) -> Iterator[file_pb2.UploadRequest]:
    yield file_pb2.UploadRequest(
        header=file_pb2.UploadHeader(filename=name, content_type="text/plain", size=4 * chunks)
    )
    for _ in range(chunks):
        yield file_pb2.UploadRequest(chunk=b"abcd")


async def test_calls_of_every_kind_and_outcome_show_exactly_on_both_sides() -> None:
    registry = CollectorRegistry()
    async with metered(registry) as rig:
        course = rig.clients.stub("course")
        files = rig.clients.stub("file")
        for _ in range(3):
            await course.GetCourse(get_course())
        rig.course.script.fail_times, rig.course.script.fail_code = 2, grpc.StatusCode.NOT_FOUND
        for _ in range(2):
            with pytest.raises(aio.AioRpcError) as caught:
                await course.GetCourse(get_course())
            assert caught.value.code() is grpc.StatusCode.NOT_FOUND

        for _ in range(2):
            chunks = [
                m.chunk async for m in files.Download(file_pb2.DownloadRequest(file_id=COURSE_ID))
            ]
            assert chunks == [b"0", b"1", b"2"]
        with pytest.raises(aio.AioRpcError) as caught:
            async for _ in files.Download(file_pb2.DownloadRequest(file_id=MISSING_ID)):
                pass
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        stalled = files.Download(file_pb2.DownloadRequest(file_id=SLOW_ID))
        first = await stalled.read()
        assert isinstance(first, file_pb2.DownloadResponse) and first.chunk == b"0"
        stalled.cancel()  # the caller gives up on a stream the server is still serving

        uploaded = await files.Upload(uploads())
        assert uploaded.file.size == 8
        with pytest.raises(aio.AioRpcError) as caught:
            await files.Upload(uploads(name=TAKEN, chunks=0))
        assert caught.value.code() is grpc.StatusCode.ALREADY_EXISTS

        # grpcio-reflection's stubs are typed for sync channels.
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(rig.clients.channel("course"))  # type: ignore[arg-type]
        asks = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=COURSE),
        ]
        answers = [answer async for answer in stub.ServerReflectionInfo(iter(asks))]
        assert len(answers) == 2

        # Served nowhere here: the client sees UNIMPLEMENTED, the server's chain nothing.
        with pytest.raises(aio.AioRpcError) as caught:
            await rig.clients.stub("auth").GetJwks(auth_pb2.GetJwksRequest())
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED

        # Requests travel one way, responses the other: what one side receives, the other
        # sent. A unary direction is one message per call (the response whatever the code),
        # a client-streaming call's response one per OK call.
        unary = {"started": 5, "received": 5, "sent": 5, "OK": 3, "NotFound": 2}
        download = {"started": 4, "OK": 2, "NotFound": 1, "Canceled": 1}
        upload = {"started": 2, "OK": 1, "AlreadyExists": 1}
        reflect = {"started": 1, "received": 2, "sent": 2, "OK": 1}
        server = expect(
            "server",
            [
                ("unary", COURSE, "GetCourse", unary),
                ("server_stream", FILES, "Download", {**download, "received": 4, "sent": 7}),
                ("client_stream", FILES, "Upload", {**upload, "received": 4, "sent": 1}),
                ("bidi_stream", REFLECTION, "ServerReflectionInfo", reflect),
            ],
        )
        refused = {"Unimplemented": 1}
        client = expect(
            "client",
            [
                ("unary", COURSE, "GetCourse", unary),
                ("server_stream", FILES, "Download", {**download, "sent": 4, "received": 7}),
                ("client_stream", FILES, "Upload", {**upload, "sent": 4, "received": 1}),
                ("bidi_stream", REFLECTION, "ServerReflectionInfo", reflect),
                ("unary", AUTH, "GetJwks", {"started": 1, "sent": 1, "received": 1, **refused}),
            ],
        )
        assert await settled(registry, server | client) == server | client

    text = generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        counts = {
            frozenset(s.labels.items()): s.value
            for s in family.samples
            if s.name.endswith("_count")
        }
        for s in family.samples:
            labels = dict(s.labels)
            if s.name.endswith("_bucket") and labels.pop("le") == "+Inf":
                assert s.value == counts[frozenset(labels.items())]
            if s.name.endswith("_sum"):
                assert s.value > 0


def handled(
    registry: CollectorRegistry, side: str, kind: str, service: str, method: str
) -> dict[str, float]:
    """The handled counts of one method on one side, by code."""
    found: dict[str, float] = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name == f"grpc_{side}_handled_total" and (
                s.labels["grpc_type"],
                s.labels["grpc_service"],
                s.labels["grpc_method"],
            ) == (kind, service, method):
                found[s.labels["grpc_code"]] = s.value
    return found


async def test_calls_whose_deadline_passes_in_flight_count_as_deadline_exceeded() -> None:
    """The caller got DEADLINE_EXCEEDED; error mapping's abort then fails on the ended call
    (grpc raises its own error), which must not be counted as Unknown."""
    registry = CollectorRegistry()
    async with metered(registry) as rig:
        rig.course.script.delay = 0.05
        course = rig.clients.stub("course")
        for _ in range(5):
            with pytest.raises(aio.AioRpcError) as caught:
                await course.GetCourse(get_course(), timeout=0.01)
            assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(0.2)  # the handlers end after their callers gave up
    assert handled(registry, "client", "unary", COURSE, "GetCourse") == {"DeadlineExceeded": 5}
    on_server = handled(registry, "server", "unary", COURSE, "GetCourse")
    assert on_server.get("DeadlineExceeded", 0) >= 1
    assert "Unknown" not in on_server and sum(on_server.values()) == 5


async def test_two_metrics_links_on_one_registry_share_the_collector() -> None:
    registry = CollectorRegistry()
    first, second = Metrics(registry, access_log=False), Metrics(registry, access_log=False)
    assert first.stats is second.stats
    assert ClientFactory(config.load(env={}), metrics_registry=registry).metrics.stats is (
        call_stats(registry, "client")
    )


async def test_concurrent_callers_and_scrapes_lose_no_count() -> None:
    """Calls finishing while other threads scrape: every scrape is a consistent picture
    (a histogram's +Inf bucket is its count; no call handled before it started) and the
    last holds every call."""
    registry = CollectorRegistry()
    calls, callers = 400, 40
    async with metered(registry) as rig:
        course = rig.clients.stub("course")
        rig.course.script.delay = 0.001
        scraping = True

        def scrape() -> list[str]:
            texts = []
            while scraping:
                texts.append(generate_latest(registry).decode())
            return texts

        scrapes = asyncio.create_task(asyncio.to_thread(scrape))

        async def caller() -> None:
            for _ in range(calls // callers):
                await course.GetCourse(get_course())

        await asyncio.gather(*(caller() for _ in range(callers)))
        scraping = False
        texts = await scrapes
    assert texts, "the scraping thread ran"
    for text in texts:
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for side in SIDES:
            seconds = families[f"grpc_{side}_handling_seconds"].samples
            count = sum(s.value for s in seconds if s.name.endswith("_count"))
            top = sum(s.value for s in seconds if s.labels.get("le") == "+Inf")
            assert count == top
            begun = sum(s.value for s in families[f"grpc_{side}_started"].samples)
            assert begun >= count
    for side in SIDES:
        assert handled(registry, side, "unary", COURSE, "GetCourse") == {"OK": calls}


async def test_a_dead_server_shows_as_unavailable_on_the_client_only() -> None:
    """The server process is gone: every call fails UNAVAILABLE, first through grpc, then
    refused by the open breaker without reaching the network; all are counted."""
    registry = CollectorRegistry()
    async with metered(registry) as rig:
        course = rig.clients.stub("course")
        await course.GetCourse(get_course())
        await rig.server.stop(0)
        failures = rig.clients.settings.client.breaker_failures
        for _ in range(failures + 3):
            with pytest.raises(aio.AioRpcError) as caught:
                await course.GetCourse(get_course(), timeout=2)
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    expected = {"OK": 1, "Unavailable": failures + 3}
    assert handled(registry, "client", "unary", COURSE, "GetCourse") == expected
    assert handled(registry, "server", "unary", COURSE, "GetCourse") == {"OK": 1}


async def test_hostile_method_names_stay_inside_their_label() -> None:
    """A caller naming any method (quotes, newlines, braces): the exposition escapes it and
    still parses to the one series, with the name intact."""
    registry = CollectorRegistry()
    evil_service, evil_method = 'x"} 1\ngrpc_client_started_total{a="', "M\\{}"
    async with metered(registry) as rig:
        channel = rig.clients.channel("course")
        call: Any = channel.unary_unary(f"/{evil_service}/{evil_method}")
        with pytest.raises(aio.AioRpcError) as caught:
            await call(b"")
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    (started,) = families["grpc_client_started"].samples
    assert started.labels == {
        "grpc_type": "unary",
        "grpc_service": evil_service,
        "grpc_method": evil_method,
    }
    assert started.value == 1


# --- the product: start_server, the admin port ------------------------------------------------


def scrape_admin(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
        return text


def admin_value(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def test_the_mesh_admin_port_serves_both_sides(tmp_path: Path) -> None:
    """`learnmesh up`'s wiring (start_server, the client factory, the admin port): a failed
    sign-in shows on the server side with Go's code name; the server's own outbound call
    for the signing keys shows on the client side."""
    async with (
        scratch_database("sqlite", tmp_path) as url,
        running_mesh(mesh_settings(tmp_path, url)) as mesh,
    ):
        admin = await start_admin("127.0.0.1", 0, mesh.server.health)
        try:
            login = {"grpc_type": "unary", "grpc_service": AUTH, "grpc_method": "Login"}
            before = await asyncio.to_thread(scrape_admin, admin.port)
            with pytest.raises(aio.AioRpcError) as caught:
                await mesh.auth.Login(
                    auth_pb2.LoginRequest(email="nobody@example.com", password=PASSWORD)
                )
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
            after = await asyncio.to_thread(scrape_admin, admin.port)
        finally:
            await admin.stop()
    name = "grpc_server_handled_total"
    code = {"grpc_code": "Unauthenticated"}
    assert (
        admin_value(after, name, **login, **code) - admin_value(before, name, **login, **code) == 1
    )
    started = "grpc_server_started_total"
    assert admin_value(after, started, **login) - admin_value(before, started, **login) == 1
    jwks = {"grpc_type": "unary", "grpc_service": AUTH, "grpc_method": "GetJwks"}
    assert admin_value(after, "grpc_client_handled_total", **jwks, grpc_code="OK") >= 1
    assert admin_value(after, "grpc_server_handled_total", **jwks, grpc_code="OK") >= 1
