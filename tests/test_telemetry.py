"""Tracing, metrics and the access log on real servers and channels (tests/support).

Spans go to the SDK's in-memory exporter; metrics to a private CollectorRegistry; the
access log is read as the JSON lines learnmesh.telemetry formats. One test runs B in another
process with the console exporter, as an operator would see it.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from grpc import aio
from opentelemetry import baggage, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import INVALID_SPAN_CONTEXT, SpanContext, SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from interceptors.client import for_every_kind
from interceptors.errors import ErrorMapping
from interceptors.link import ServerLink
from interceptors.metrics import ACCESS_LOGGER, Metrics
from interceptors.request_id import ClientRequestId, RequestId
from interceptors.spans import RecordedSpan, SpanStarter
from interceptors.tracing import (
    TRACER_NAME,
    ClientTracing,
    Propagation,
    Tracing,
    propagators_from_env,
)
from learnmesh import config, telemetry
from learnmesh.config import ConfigError
from learnmesh.course.v1 import course_pb2, course_pb2_grpc
from learnmesh.file.v1 import file_pb2, file_pb2_grpc
from learnmesh.kernel import logs
from tests.support.doubles import COURSE_ID, CourseDouble, FileDouble
from tests.support.processes import python_module, server_process
from tests.support.servers import Served, chain_links, serve

ROOT = Path(__file__).resolve().parent.parent
COURSE = "learnmesh.course.v1.CourseService"
FILES = "learnmesh.file.v1.FileService"
GET_COURSE = f"{COURSE}/GetCourse"
TRACE_HEX = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_HEX = "00f067aa0ba902b7"


class SeededIds(RandomIdGenerator):
    """Trace and span ids from a fixed seed, so sampling counts do not vary between runs."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def generate_trace_id(self) -> int:
        return self._random.getrandbits(128)

    def generate_span_id(self) -> int:
        return self._random.getrandbits(64)


class Opaque(Sampler):
    """The decisions of ``inner`` through a sampler the fast path does not know: the SDK
    must decide and make every span."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner

    def should_sample(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return f"Opaque({self.inner.get_description()})"


# The paths the tracing links can take, by how the provider is set up:
# "lazy": the SDK's random ids (what setup_tracing builds): decided and made by SpanStarter,
#   a dropped root's ids drawn only when asked for;
# "eager": other ids, decided and made by SpanStarter with ids drawn at once;
# "sdk": a sampler SpanStarter does not know: the SDK decides and makes every span.
ID_MODES = ("lazy", "eager", "sdk")


def attrs(span: ReadableSpan) -> Mapping[str, Any]:
    """A finished span's attributes (the SDK types them optional)."""
    assert span.attributes is not None, span
    return span.attributes


def parent_of(span: ReadableSpan) -> SpanContext:
    assert span.parent is not None, span
    return span.parent


def description(span: ReadableSpan) -> str:
    assert span.status.description is not None, span
    return span.status.description


class Traces:
    """A tracer provider whose finished spans land in memory."""

    def __init__(
        self,
        sampler: Sampler | None = None,
        ids: str = "lazy",
        seed: int = 1,
        limits: SpanLimits | None = None,
    ) -> None:
        self.exporter = InMemorySpanExporter()
        sampler = sampler or ParentBased(ALWAYS_ON)
        self.provider = TracerProvider(
            sampler=Opaque(sampler) if ids == "sdk" else sampler,
            id_generator=None if ids == "lazy" else SeededIds(seed),
            span_limits=limits,
        )
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    async def wait_for(self, count: int, name: str | None = None) -> list[ReadableSpan]:
        """Spans that end after the caller got its answer (cancelled, timed out) end soon."""
        for _ in range(300):
            found = self.spans(name)
            if len(found) >= count:
                return found
            await asyncio.sleep(0.01)
        raise AssertionError(f"expected {count} spans named {name}, got {self.spans(name)}")


@pytest.fixture
def traces() -> Iterator[Traces]:
    made = Traces()
    yield made
    made.provider.shutdown()


def traced_links(provider: TracerProvider) -> list[ServerLink]:
    """The product's request id, tracing and error mapping links, spans to ``provider``."""
    return chain_links(RequestId, Tracing, ErrorMapping, tracer_provider=provider)


@asynccontextmanager
async def running(
    links: Sequence[ServerLink],
    *,
    course: CourseDouble | None = None,
    files: FileDouble | None = None,
    client_interceptors: Sequence[aio.ClientInterceptor] = (),
) -> AsyncIterator[tuple[Served, aio.Channel]]:
    """A server with ``links`` and a channel to it."""
    served = await serve(links, course=course or CourseDouble(), files=files)
    channel = aio.insecure_channel(served.address, interceptors=for_every_kind(client_interceptors))
    try:
        yield served, channel
    finally:
        await channel.close()
        await served.stop()


def get_course() -> course_pb2.GetCourseRequest:
    return course_pb2.GetCourseRequest(course_id=COURSE_ID)


def hex_of(trace_id: int) -> str:
    return f"{trace_id:032x}"


class Unmapped(CourseDouble):
    """A handler bug: an exception nobody maps, with text that must not leave the process."""

    async def GetCourse(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        raise RuntimeError("SELECT password_hash FROM auth_users")


class RawMetadata(CourseDouble):
    """B that keeps the metadata pairs exactly as they arrived (repeats included)."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[tuple[str, Any], ...]] = []

    async def GetCourse(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        self.received.append(tuple(context.invocation_metadata() or ()))
        return await super().GetCourse(request, context)


class Relay(CourseDouble):
    """A: answers GetCourse by asking B while serving the call (A calls B)."""

    def __init__(self, b_channel: aio.Channel) -> None:
        super().__init__()
        self.b = course_pb2_grpc.CourseServiceStub(b_channel)

    async def GetCourse(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        logging.getLogger("tests.relay").info("asking B", extra={"course_id": request.course_id})
        # A stale traceparent of the caller's own must be replaced, not sent twice.
        stale = (("traceparent", f"00-{'1' * 32}-{'2' * 16}-01"),)
        return await self.b.GetCourse(request, metadata=stale)


class SlowFiles(FileDouble):
    """Download: one chunk, then either a failure or a long wait (to be cancelled)."""

    def __init__(self, fail: grpc.StatusCode | None = None) -> None:
        self.fail = fail

    async def Download(
        self, request: Any, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        yield file_pb2.DownloadResponse(chunk=b"first")
        if self.fail is not None:
            await context.abort(self.fail, "the stored bytes are damaged")
        await asyncio.sleep(30)
        yield file_pb2.DownloadResponse(chunk=b"never")


def uploads() -> Iterator[file_pb2.UploadRequest]:
    yield file_pb2.UploadRequest(
        header=file_pb2.UploadHeader(
            filename="notes.txt",
            content_type="text/plain",
            size=8,
            purpose=file_pb2.PURPOSE_ATTACHMENT,
        )
    )
    yield file_pb2.UploadRequest(chunk=b"abcd")
    yield file_pb2.UploadRequest(chunk=b"efgh")


# --- server spans ----------------------------------------------------------------------------


async def test_server_span_of_an_ok_call_has_name_rpc_attributes_and_peer(
    traces: Traces,
) -> None:
    async with running(traced_links(traces.provider)) as (_, channel):
        reply = await course_pb2_grpc.CourseServiceStub(channel).GetCourse(
            get_course(), metadata=(("x-request-id", "req-span-ok"),)
        )
    assert reply.course.id == COURSE_ID
    (span,) = traces.spans()
    assert span.name == GET_COURSE
    assert span.kind is SpanKind.SERVER
    assert span.parent is None  # no traceparent: a new trace
    attributes = dict(span.attributes or {})
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == COURSE
    assert attributes["rpc.method"] == "GetCourse"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["network.peer.address"] == "127.0.0.1"
    assert attributes["learnmesh.request_id"] == "req-span-ok"
    assert span.status.status_code is StatusCode.UNSET


async def test_aborted_calls_record_the_final_code_and_only_server_faults_are_errors(
    traces: Traces,
) -> None:
    course = CourseDouble()
    links = traced_links(traces.provider)
    async with running(links, course=course) as (_, channel):
        stub = course_pb2_grpc.CourseServiceStub(channel)
        for code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
            course.script.fail_times, course.script.fail_code = 1, code
            with pytest.raises(aio.AioRpcError) as caught:
                await stub.GetCourse(get_course())
            assert caught.value.code() is code
    not_found, unavailable = traces.spans()
    assert attrs(not_found)["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert not_found.status.status_code is StatusCode.UNSET  # the caller's fault, not ours
    assert attrs(unavailable)["rpc.grpc.status_code"] == 14
    assert unavailable.status.status_code is StatusCode.ERROR
    assert unavailable.status.description == "UNAVAILABLE: scripted failure"


async def test_an_unmapped_exception_is_internal_and_its_text_stays_out_of_the_span(
    traces: Traces,
) -> None:
    links = traced_links(traces.provider)
    async with running(links, course=Unmapped()) as (_, channel):
        with pytest.raises(aio.AioRpcError) as caught:
            await course_pb2_grpc.CourseServiceStub(channel).GetCourse(get_course())
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    (span,) = traces.spans()
    assert attrs(span)["rpc.grpc.status_code"] == 13
    assert span.status.status_code is StatusCode.ERROR
    assert description(span).startswith("INTERNAL: internal error")
    assert "SELECT" not in description(span)
    assert not span.events  # no exception event carrying the text either


async def test_without_error_mapping_an_escaping_exception_is_unknown(traces: Traces) -> None:
    async with running([Tracing(traces.provider)], course=Unmapped()) as (_, channel):
        with pytest.raises(aio.AioRpcError) as caught:
            await course_pb2_grpc.CourseServiceStub(channel).GetCourse(get_course())
    assert caught.value.code() is grpc.StatusCode.UNKNOWN
    (span,) = traces.spans()
    assert attrs(span)["rpc.grpc.status_code"] == 2
    assert span.status.description == "UNKNOWN"


async def test_deadline_exceeded_and_cancelled_calls(traces: Traces) -> None:
    course = CourseDouble()
    course.script.delay = 2.0
    async with running([Tracing(traces.provider)], course=course) as (_, channel):
        stub = course_pb2_grpc.CourseServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as caught:
            await stub.GetCourse(get_course(), timeout=0.2)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        (timed_out,) = await traces.wait_for(1)

        call = stub.GetCourse(get_course())
        await asyncio.sleep(0.2)
        call.cancel()
        _, cancelled = await traces.wait_for(2)
    assert course.script.cancelled == 2
    assert attrs(timed_out)["rpc.grpc.status_code"] == 4
    assert timed_out.status.status_code is StatusCode.ERROR
    assert attrs(cancelled)["rpc.grpc.status_code"] == 1
    assert cancelled.status.status_code is StatusCode.UNSET


async def test_traceparent_in_metadata_becomes_the_parent(traces: Traces) -> None:
    async with running([Tracing(traces.provider)]) as (_, channel):
        stub = course_pb2_grpc.CourseServiceStub(channel)
        await stub.GetCourse(
            get_course(),
            metadata=(
                ("traceparent", f"00-{TRACE_HEX}-{SPAN_HEX}-01"),
                ("tracestate", "vendor=opaque,other=1"),
            ),
        )
        # Malformed headers start a new trace rather than failing the call.
        for bad in (f"00-{'0' * 32}-{SPAN_HEX}-01", f"ff-{TRACE_HEX}-{SPAN_HEX}-01", "junk"):
            await stub.GetCourse(get_course(), metadata=(("traceparent", bad),))
    child, *fresh = traces.spans()
    assert hex_of(child.context.trace_id) == TRACE_HEX
    assert child.parent is not None
    assert f"{parent_of(child).span_id:016x}" == SPAN_HEX
    assert parent_of(child).is_remote
    assert child.context.span_id != parent_of(child).span_id
    assert child.context.trace_state.get("vendor") == "opaque"
    assert len(fresh) == 3
    for span in fresh:
        assert span.parent is None
        assert hex_of(span.context.trace_id) != TRACE_HEX


async def test_a_calls_b_one_trace_with_parent_and_child_links(traces: Traces) -> None:
    b_course = RawMetadata()
    b_links = traced_links(traces.provider)
    async with running(b_links, course=b_course) as (b, _):
        b_channel = aio.insecure_channel(
            b.address,
            interceptors=for_every_kind([ClientTracing(traces.provider), ClientRequestId()]),
        )
        links = traced_links(traces.provider)
        async with running(links, course=Relay(b_channel)) as (_, a_channel):
            reply = await course_pb2_grpc.CourseServiceStub(a_channel).GetCourse(
                get_course(), metadata=(("x-request-id", "req-a-to-b"),)
            )
        await b_channel.close()
    assert reply.course.id == COURSE_ID
    spans = traces.spans(GET_COURSE)
    assert len(spans) == 3
    a_server = next(s for s in spans if s.kind is SpanKind.SERVER and s.parent is None)
    (a_client,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    b_server = next(s for s in spans if s.kind is SpanKind.SERVER and s.parent is not None)
    assert {s.context.trace_id for s in spans} == {a_server.context.trace_id}
    assert parent_of(a_client).span_id == a_server.context.span_id
    assert not parent_of(a_client).is_remote
    assert parent_of(b_server).span_id == a_client.context.span_id
    assert parent_of(b_server).is_remote
    assert attrs(a_client)["rpc.service"] == COURSE
    assert attrs(a_client)["rpc.method"] == "GetCourse"
    assert attrs(a_client)["rpc.grpc.status_code"] == 0
    assert a_client.status.status_code is StatusCode.UNSET
    # B received exactly one traceparent (the client span's) and A's request id.
    (received,) = b_course.received
    flags = f"{a_client.context.trace_flags:02x}"
    assert [value for key, value in received if key == "traceparent"] == [
        f"00-{hex_of(a_client.context.trace_id)}-{a_client.context.span_id:016x}-{flags}"
    ]
    assert attrs(b_server)["learnmesh.request_id"] == "req-a-to-b"


async def test_a_failing_b_marks_the_client_span(traces: Traces) -> None:
    b_course = CourseDouble()
    b_course.script.fail_times, b_course.script.fail_code = 1, grpc.StatusCode.PERMISSION_DENIED
    async with running([Tracing(traces.provider)], course=b_course) as (b, _):
        channel = aio.insecure_channel(
            b.address, interceptors=for_every_kind([ClientTracing(traces.provider)])
        )
        with pytest.raises(aio.AioRpcError):
            await course_pb2_grpc.CourseServiceStub(channel).GetCourse(get_course())
        await channel.close()
    (client,) = [s for s in traces.spans() if s.kind is SpanKind.CLIENT]
    assert client.parent is None  # nothing was current: the client span is the root
    assert attrs(client)["rpc.grpc.status_code"] == 7
    assert client.status.status_code is StatusCode.ERROR  # any failure, for a client span
    assert client.status.description == "PERMISSION_DENIED"


# --- streaming --------------------------------------------------------------------------------


async def test_streaming_calls_get_spans_with_their_final_status(traces: Traces) -> None:
    client = ClientTracing(traces.provider)
    async with running(
        traced_links(traces.provider),
        files=FileDouble(),
        client_interceptors=[client],
    ) as (_, channel):
        stub = file_pb2_grpc.FileServiceStub(channel)
        uploaded = await stub.Upload(uploads())
        chunks = [m.chunk async for m in stub.Download(file_pb2.DownloadRequest(file_id=COURSE_ID))]
        await traces.wait_for(2, f"{FILES}/Download")
    assert uploaded.file.size == 8
    assert chunks == [bytes([i]) * 4 for i in range(3)]
    for name in ("Upload", "Download"):
        server, client_span = sorted(
            traces.spans(f"{FILES}/{name}"), key=lambda s: s.kind is SpanKind.CLIENT
        )
        assert server.kind is SpanKind.SERVER and client_span.kind is SpanKind.CLIENT
        assert attrs(server)["rpc.method"] == name
        assert attrs(server)["rpc.grpc.status_code"] == 0
        assert attrs(client_span)["rpc.grpc.status_code"] == 0
        assert parent_of(server).span_id == client_span.context.span_id
        assert server.context.trace_id == client_span.context.trace_id


async def test_streaming_failure_and_cancellation_mid_stream(traces: Traces) -> None:
    links = traced_links(traces.provider)
    async with running(links, files=SlowFiles(fail=grpc.StatusCode.DATA_LOSS)) as (_, channel):
        call = file_pb2_grpc.FileServiceStub(channel).Download(
            file_pb2.DownloadRequest(file_id=COURSE_ID)
        )
        with pytest.raises(aio.AioRpcError) as caught:
            async for _ in call:
                pass
        assert caught.value.code() is grpc.StatusCode.DATA_LOSS
    async with running(links, files=SlowFiles()) as (_, channel):
        call = file_pb2_grpc.FileServiceStub(channel).Download(
            file_pb2.DownloadRequest(file_id=COURSE_ID)
        )
        first = await call.read()
        assert isinstance(first, file_pb2.DownloadResponse)
        assert first.chunk == b"first"
        call.cancel()
        failed, cancelled = await traces.wait_for(2)
    assert attrs(failed)["rpc.grpc.status_code"] == grpc.StatusCode.DATA_LOSS.value[0]
    assert failed.status.status_code is StatusCode.ERROR
    assert "damaged" in description(failed)
    assert attrs(cancelled)["rpc.grpc.status_code"] == 1
    assert cancelled.status.status_code is StatusCode.UNSET


# --- sampling ---------------------------------------------------------------------------------


@pytest.fixture
def seeded_random() -> Iterator[None]:
    """The lazy path draws from the random module: seed it, and restore it afterwards."""
    state = random.getstate()
    random.seed(20241123)
    yield
    random.setstate(state)


@pytest.mark.span_parity
@pytest.mark.parametrize("ids", ID_MODES)
@pytest.mark.usefixtures("seeded_random")
async def test_ten_percent_parent_based_sampling_records_about_a_tenth_of_roots(
    ids: str,
) -> None:
    sampled = Traces(ParentBased(TraceIdRatioBased(0.1)), ids=ids, seed=20241123)
    async with running([Tracing(sampled.provider)]) as (_, channel):
        stub = course_pb2_grpc.CourseServiceStub(channel)
        for _ in range(400):
            await stub.GetCourse(get_course())
    spans = sampled.spans()
    # 40 expected (binomial sd about 6); the seeds make the count the same on every run.
    assert 22 <= len(spans) <= 60, len(spans)
    bound = TraceIdRatioBased(0.1).bound
    assert all(s.context.trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < bound for s in spans)
    assert all(s.parent is None for s in spans)
    sampled.provider.shutdown()


@pytest.mark.span_parity
@pytest.mark.parametrize("ids", ID_MODES)
async def test_sampling_follows_the_callers_decision(ids: str) -> None:
    sampled = Traces(ParentBased(TraceIdRatioBased(0.1)), ids=ids)
    async with running([Tracing(sampled.provider)]) as (_, channel):
        stub = course_pb2_grpc.CourseServiceStub(channel)
        for flags, count in (("00", 20), ("01", 20)):
            for i in range(count):
                parent = f"00-{i + 1:032x}-{SPAN_HEX}-{flags}"
                await stub.GetCourse(get_course(), metadata=(("traceparent", parent),))
    spans = sampled.spans()
    # Not one of the 20 calls with an unsampled parent was recorded; all 20 sampled ones were.
    assert len(spans) == 20
    assert {s.context.trace_id for s in spans} == set(range(1, 21))
    sampled.provider.shutdown()


@pytest.mark.span_parity
@pytest.mark.parametrize("ids", ID_MODES)
@pytest.mark.usefixtures("seeded_random")
async def test_a_roots_decision_travels_to_b(ids: str) -> None:
    sampled = Traces(ParentBased(TraceIdRatioBased(0.1)), ids=ids, seed=7)
    b_course = RawMetadata()
    async with running([Tracing(sampled.provider)], course=b_course) as (b, _):
        b_channel = aio.insecure_channel(
            b.address, interceptors=for_every_kind([ClientTracing(sampled.provider)])
        )
        links = chain_links(Tracing, ErrorMapping, tracer_provider=sampled.provider)
        async with running(links, course=Relay(b_channel)) as (_, a_channel):
            stub = course_pb2_grpc.CourseServiceStub(a_channel)
            for _ in range(100):
                await stub.GetCourse(get_course())
        await b_channel.close()
    spans = sampled.spans()
    roots = {s.context.trace_id for s in spans if s.parent is None}
    assert 2 <= len(roots) <= 25
    # Every sampled trace is complete (A server, A client, B server) and nothing else exists.
    assert len(spans) == 3 * len(roots)
    assert {s.context.trace_id for s in spans} == roots
    # The dropped calls still told B their trace id and decision: 100 distinct traces.
    sent = [dict(pairs)["traceparent"] for pairs in b_course.received]
    assert len({value.split("-")[1] for value in sent}) == 100
    assert sum(value.endswith("-01") or value.endswith("-03") for value in sent) == len(roots)
    sampled.provider.shutdown()


@pytest.mark.span_parity
@pytest.mark.parametrize(
    ("sampler", "known"),
    [
        (ParentBased(TraceIdRatioBased(0.1)), True),
        (ParentBasedTraceIdRatio(0.5), True),
        (ParentBased(ALWAYS_ON), True),
        (ParentBased(ALWAYS_OFF), True),
        (TraceIdRatioBased(0.3), True),
        (ALWAYS_OFF, True),
        (ALWAYS_ON, True),
        (Opaque(ALWAYS_ON), False),
        (ParentBased(Opaque(ALWAYS_ON)), False),
        (ParentBased(TraceIdRatioBased(0.1), remote_parent_not_sampled=ALWAYS_ON), False),
    ],
)
def test_the_fast_path_is_taken_only_for_samplers_it_can_follow(
    sampler: Sampler, known: bool
) -> None:
    assert (SpanStarter(Traces(sampler).provider, TRACER_NAME).path is not None) is known
    assert (
        SpanStarter(Traces(sampler, ids="eager").provider, TRACER_NAME).path is not None
    ) is known
    assert SpanStarter(Traces(sampler, ids="sdk").provider, TRACER_NAME).path is None


@pytest.mark.span_parity
@pytest.mark.parametrize(
    "limits",
    [SpanLimits(max_span_attribute_length=64), SpanLimits(max_span_attributes=8)],
)
def test_limits_that_could_cut_the_links_attributes_leave_spans_to_the_sdk(
    limits: SpanLimits,
) -> None:
    assert SpanStarter(Traces(limits=limits).provider, TRACER_NAME).path is None
    assert SpanStarter(Traces(limits=SpanLimits()).provider, TRACER_NAME).path is not None


@pytest.mark.span_parity
def test_the_sdks_internal_span_metrics_leave_spans_to_the_sdk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")
    assert SpanStarter(Traces().provider, TRACER_NAME).path is None


@pytest.mark.span_parity
@pytest.mark.parametrize("ids", ["lazy", "eager"])
@pytest.mark.usefixtures("seeded_random")
def test_dropped_and_sampled_roots_keep_the_ratio_rule(ids: str) -> None:
    sampler = ParentBased(TraceIdRatioBased(0.25))
    traces = Traces(sampler, ids=ids, seed=3)
    starter = SpanStarter(traces.provider, TRACER_NAME)
    spans = [starter.start("root", SpanKind.SERVER, Context(), None, {}) for _ in range(2000)]
    recorded = [span for span in spans if span.is_recording()]
    assert 400 <= len(recorded) <= 600
    for span in spans:
        span_context = span.get_span_context()
        assert span_context.is_valid
        assert span.get_span_context() is span_context  # drawn once, then kept
        low = span_context.trace_id & TraceIdRatioBased.TRACE_ID_LIMIT
        assert (low < cast(TraceIdRatioBased, sampler._root).bound) is span.is_recording()
        assert span_context.trace_flags.sampled is span.is_recording()
        assert span_context.trace_flags.random_trace_id  # both id generators are random
    assert len({s.get_span_context().trace_id for s in spans}) == 2000
    for span in recorded:
        span.end()


# --- recorded spans are the SDK's spans -------------------------------------------------------


class Stamping(SpanProcessor):
    """A processor that reads and changes spans as they start and end, as the SDK lets it."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        self.seen.append((span.name, span.kind, span.parent, dict(span.attributes)))
        span.set_attribute("stamped.at_start", span.name)

    def _on_ending(self, span: Any) -> None:
        self.seen.append((span.name, span.is_recording()))
        span.set_attribute("stamped.on_ending", True)  # too late, in the SDK too


class Annotating(CourseDouble):
    """A handler that adds to its call's span everything the API offers."""

    async def GetCourse(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        span = trace.get_current_span()
        span.set_attribute("course.level", "beginner")
        span.set_attributes({f"course.n{i}": i for i in range(40)})  # past the count limit
        span.set_attribute("course.tags", ["grpc", "intro"])  # cleaned to a tuple
        span.set_attribute("course.weird", object())  # type: ignore[arg-type]  # not a value
        span.set_attribute("", "no key")  # dropped and counted
        span.set_attribute("course.level", "advanced")  # set again: moves to the end
        span.add_event("cache miss", {"key": "course:1", "size": 3, "bad": object(), "n": 1})  # type: ignore[dict-item]
        span.add_link(
            SpanContext(int(TRACE_HEX, 16), int(SPAN_HEX, 16), True), {"link.kind": "follows"}
        )
        span.add_link(INVALID_SPAN_CONTEXT)  # says nothing: not kept
        try:
            raise ValueError("no such lesson")
        except ValueError as exc:
            span.record_exception(exc, {"lesson": 7})
        span.update_name("CourseService/GetCourse annotated")
        span.set_status(StatusCode.OK)
        span.set_status(StatusCode.ERROR, "ignored: OK is final")
        return await super().GetCourse(request, context)


def portrait(span: ReadableSpan) -> dict[str, Any]:
    """What an exporter reads of a span, but for ids, times and stack traces."""
    assert span.start_time is not None and span.end_time is not None
    assert span.start_time <= span.end_time
    events = []
    for event in span.events:
        attributes = dict(event.attributes or {})
        if "exception.stacktrace" in attributes:
            assert "ValueError: no such lesson" in str(attributes.pop("exception.stacktrace"))
        events.append((event.name, attributes, event.dropped_attributes))
    return {
        "name": span.name,
        "kind": span.kind,
        "parent": span.parent,
        "flags": span.context.trace_flags,
        "state": span.context.trace_state,
        "attributes": list(dict(span.attributes or {}).items()),
        "dropped_attributes": span.dropped_attributes,
        "events": events,
        "links": [
            (link.context, dict(link.attributes or {}), link.dropped_attributes)
            for link in span.links
        ],
        "status": (span.status.status_code, span.status.description),
        "resource": span.resource,
        "scope": span.instrumentation_scope,
    }


@pytest.mark.span_parity
@pytest.mark.parametrize("traceparent", [None, f"00-{TRACE_HEX}-{SPAN_HEX}-01"])
async def test_a_recorded_span_exports_what_the_sdks_span_would(traceparent: str | None) -> None:
    """One call annotated by its handler, through SpanStarter's spans and the SDK's own,
    under count limits the handler runs past: processors and exporters see the same."""
    limits = SpanLimits(max_span_attributes=40, max_event_attributes=3, max_links=4)
    portraits, seen = [], []
    for ids in ("lazy", "sdk"):
        traces = Traces(ids=ids, limits=limits)
        stamping = Stamping()
        traces.provider.add_span_processor(stamping)
        assert (SpanStarter(traces.provider, TRACER_NAME).path is None) is (ids == "sdk")
        metadata = () if traceparent is None else (("traceparent", traceparent),)
        async with running([Tracing(traces.provider)], course=Annotating()) as (_, channel):
            await course_pb2_grpc.CourseServiceStub(channel).GetCourse(
                get_course(), metadata=metadata
            )
        (span,) = traces.spans()
        portraits.append(portrait(span))
        seen.append(stamping.seen)
        traces.provider.shutdown()
    ours, sdks = portraits
    assert ours == sdks
    assert seen[0] == seen[1]
    assert seen[0][0][0] == GET_COURSE and seen[0][0][3]["rpc.method"] == "GetCourse"
    attributes = dict(ours["attributes"])
    assert ours["name"] == "CourseService/GetCourse annotated"
    assert ours["dropped_attributes"] > 0 and len(attributes) == 40
    assert "rpc.system" not in attributes  # the oldest went first
    assert list(attributes)[-3:] == ["course.weird", "course.level", "rpc.grpc.status_code"]
    assert attributes["course.tags"] == ("grpc", "intro")
    assert ours["status"] == (StatusCode.OK, None)
    assert [name for name, _, _ in ours["events"]] == ["cache miss", "exception"]
    (_, miss, miss_dropped), (_, exception, _) = ours["events"]
    assert miss_dropped == 1 and miss["n"] == 1
    assert exception == {"exception.escaped": "False", "lesson": 7}  # and the stack trace
    (link,) = ours["links"]
    assert link[1] == {"link.kind": "follows"}


@pytest.mark.span_parity
async def test_a_recorded_span_refuses_changes_once_ended(
    traces: Traces, caplog: pytest.LogCaptureFixture
) -> None:
    starter = SpanStarter(traces.provider, TRACER_NAME)
    span = starter.start("once", SpanKind.INTERNAL, Context(), None, {"a": "1"})
    assert span.is_recording()
    span.end()
    assert not span.is_recording()
    span.set_attribute("late", 1)
    span.add_event("late")
    span.set_status(StatusCode.ERROR)
    span.update_name("renamed")
    span.end()
    (exported,) = traces.spans()
    assert exported.name == "once"
    assert dict(exported.attributes or {}) == {"a": "1"}
    assert not exported.events
    assert exported.status.status_code is StatusCode.UNSET
    assert "ended span" in caplog.text


# --- the SDK's own spans on request -----------------------------------------------------------


class CurrentSpanType(CourseDouble):
    """Records the type of the span current in the handler (the server link's)."""

    def __init__(self) -> None:
        super().__init__()
        self.types: list[type[Any]] = []

    async def GetCourse(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        self.types.append(type(trace.get_current_span()))
        return await super().GetCourse(request, context)


@pytest.mark.span_parity
@pytest.mark.parametrize("sdk_spans", [False, True])
async def test_the_sdk_spans_setting_makes_the_sdk_make_every_span(
    traces: Traces, sdk_spans: bool
) -> None:
    course = CurrentSpanType()
    links = [Tracing(traces.provider, sdk_spans=sdk_spans)]
    client = ClientTracing(traces.provider, sdk_spans=sdk_spans)
    assert (client.starter.path is None) is sdk_spans
    async with running(links, course=course, client_interceptors=[client]) as (_, channel):
        await course_pb2_grpc.CourseServiceStub(channel).GetCourse(get_course())
    (kind,) = course.types
    assert issubclass(kind, sdk_trace.Span) is sdk_spans  # the SDK's own (its _Span)
    assert (kind is RecordedSpan) is not sdk_spans
    server, client_span = sorted(traces.spans(GET_COURSE), key=lambda s: s.kind.value)
    assert server.kind is SpanKind.SERVER and client_span.kind is SpanKind.CLIENT
    assert parent_of(server).span_id == client_span.context.span_id


def test_the_assembly_passes_the_sdk_spans_setting_to_both_tracing_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from learnmesh.server import build_runtime, server_links

    traces = Traces()
    # The links use the global provider: an SDK one here, whose spans the fast path can make.
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: traces.provider)
    for value, fast in (("false", True), ("true", False)):
        env = {"LEARNMESH_TLS_ENABLED": "false", "LEARNMESH_VAR_DIR": str(tmp_path)}
        settings = config.load(env={**env, "LEARNMESH_TELEMETRY_SDK_SPANS": value})
        assert settings.telemetry.sdk_spans is not fast
        runtime, _ = build_runtime(settings, "test")
        (tracing,) = [
            link for link in server_links(runtime, {}, tls=False) if isinstance(link, Tracing)
        ]
        (client,) = [
            i for i in runtime.clients._chain("127.0.0.1:1") if isinstance(i, ClientTracing)
        ]
        assert (tracing.starter.path is not None) is fast
        assert (client.starter.path is not None) is fast
    traces.provider.shutdown()


# --- propagation: OTEL_PROPAGATORS and baggage, over the wire -------------------------------

W3C_BAGGAGE = W3CBaggagePropagator()


class BaggageRelay(Relay):
    """A: notes the baggage its handler runs with, then asks B (A calls B)."""

    def __init__(self, b_channel: aio.Channel) -> None:
        super().__init__(b_channel)
        self.baggage: list[dict[str, object]] = []

    async def GetCourse(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        self.baggage.append(dict(baggage.get_all()))
        return await self.b.GetCourse(request)


@asynccontextmanager
async def a_calls_b(
    traces: Traces, propagators: Sequence[str] | None
) -> AsyncIterator[tuple[aio.Channel, BaggageRelay, RawMetadata]]:
    """B behind the tracing link; A behind it too, calling B through ClientTracing; a
    channel to A. Every link is made with ``propagators``."""
    b_course = RawMetadata()
    async with running([Tracing(traces.provider, propagators=propagators)], course=b_course) as (
        b,
        _,
    ):
        client = ClientTracing(traces.provider, propagators=propagators)
        b_channel = aio.insecure_channel(b.address, interceptors=for_every_kind([client]))
        relay = BaggageRelay(b_channel)
        links = [Tracing(traces.provider, propagators=propagators)]
        async with running(links, course=relay) as (_, a_channel):
            yield a_channel, relay, b_course
        await b_channel.close()


def test_otel_propagators_is_read_as_the_sdk_reads_it() -> None:
    assert propagators_from_env({}) == ("tracecontext", "baggage")
    assert propagators_from_env({"OTEL_PROPAGATORS": " TraceContext , b3multi "}) == (
        "tracecontext",
        "b3multi",
    )
    w3c = Propagation(["tracecontext", "baggage"])
    assert (w3c.tracecontext, w3c.baggage, w3c.use_global) == (True, True, False)
    only = Propagation(["tracecontext"])
    assert (only.tracecontext, only.baggage, only.use_global) == (True, False, False)
    off = Propagation(["none"])
    assert (off.tracecontext, off.baggage, off.use_global) == (False, False, False)
    other = Propagation(["tracecontext", "b3"])
    assert (other.tracecontext, other.baggage, other.use_global) == (False, False, True)


async def test_baggage_travels_from_the_inbound_call_to_the_outbound_one(traces: Traces) -> None:
    async with a_calls_b(traces, None) as (a_channel, relay, b_course):
        await course_pb2_grpc.CourseServiceStub(a_channel).GetCourse(
            get_course(),
            metadata=(
                ("traceparent", f"00-{TRACE_HEX}-{SPAN_HEX}-01"),
                ("baggage", "tenant=acme,user.tier=pro"),
            ),
        )
        # Without a traceparent, baggage still arrives and is passed on.
        await course_pb2_grpc.CourseServiceStub(a_channel).GetCourse(
            get_course(), metadata=(("baggage", "tenant=solo"),)
        )
        # No baggage in, none out.
        await course_pb2_grpc.CourseServiceStub(a_channel).GetCourse(get_course())
    assert relay.baggage == [{"tenant": "acme", "user.tier": "pro"}, {"tenant": "solo"}, {}]
    sent = [[v for k, v in pairs if k == "baggage"] for pairs in b_course.received]
    assert [len(values) for values in sent] == [1, 1, 0]
    assert [dict(baggage.get_all(W3C_BAGGAGE.extract({"baggage": v[0]}))) for v in sent[:2]] == [
        {"tenant": "acme", "user.tier": "pro"},
        {"tenant": "solo"},
    ]
    # The trace went through as before: B's span is a child of A's client span.
    first = [s for s in traces.spans(GET_COURSE) if hex_of(s.context.trace_id) == TRACE_HEX]
    (a_client,) = [s for s in first if s.kind is SpanKind.CLIENT]
    (b_server,) = [s for s in first if s.parent and s.parent.span_id == a_client.context.span_id]
    assert b_server.kind is SpanKind.SERVER and parent_of(b_server).is_remote


async def test_propagators_without_baggage_neither_read_nor_send_it(traces: Traces) -> None:
    async with a_calls_b(traces, ["tracecontext"]) as (a_channel, relay, b_course):
        await course_pb2_grpc.CourseServiceStub(a_channel).GetCourse(
            get_course(),
            metadata=(
                ("traceparent", f"00-{TRACE_HEX}-{SPAN_HEX}-01"),
                ("baggage", "tenant=acme"),
            ),
        )
    assert relay.baggage == [{}]
    (received,) = b_course.received
    assert "baggage" not in dict(received)
    assert dict(received)["traceparent"].split("-")[1] == TRACE_HEX


@pytest.fixture
def b3_global() -> Iterator[None]:
    """OpenTelemetry's global propagator as OTEL_PROPAGATORS=b3multi,baggage makes it."""
    from opentelemetry.propagators.b3 import B3MultiFormat
    from opentelemetry.propagators.composite import CompositePropagator

    before = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([B3MultiFormat(), W3CBaggagePropagator()]))
    yield
    propagate.set_global_textmap(before)


@pytest.mark.usefixtures("b3_global")
async def test_other_propagators_go_through_the_global_propagator(traces: Traces) -> None:
    names = propagators_from_env({"OTEL_PROPAGATORS": "b3multi,baggage"})
    async with a_calls_b(traces, names) as (a_channel, relay, b_course):
        await course_pb2_grpc.CourseServiceStub(a_channel).GetCourse(
            get_course(),
            metadata=(
                ("x-b3-traceid", TRACE_HEX),
                ("x-b3-spanid", SPAN_HEX),
                ("x-b3-sampled", "1"),
                ("baggage", "tenant=acme"),
                # Not among OTEL_PROPAGATORS: ignored.
                ("traceparent", f"00-{'1' * 32}-{'2' * 16}-01"),
            ),
        )
    assert relay.baggage == [{"tenant": "acme"}]
    spans = traces.spans(GET_COURSE)
    assert len(spans) == 3
    assert {hex_of(s.context.trace_id) for s in spans} == {TRACE_HEX}
    a_server = next(s for s in spans if parent_of(s).span_id == int(SPAN_HEX, 16))
    assert a_server.kind is SpanKind.SERVER and parent_of(a_server).is_remote
    (a_client,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    (received,) = b_course.received
    headers = dict(received)
    assert "traceparent" not in headers
    assert headers["x-b3-traceid"] == TRACE_HEX
    assert headers["x-b3-spanid"] == f"{a_client.context.span_id:016x}"
    assert headers["baggage"] == "tenant=acme"


# --- the access log ---------------------------------------------------------------------------


class Lines(logging.Handler):
    """Formats records where they are logged, as the real handler does, and keeps them."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logs.JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def objects(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]


@pytest.fixture
def access_lines() -> Iterator[Lines]:
    logger = logging.getLogger(ACCESS_LOGGER)
    handler, level = Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


async def test_access_log_writes_one_json_line_per_call(
    traces: Traces, access_lines: Lines
) -> None:
    course = CourseDouble()
    links = chain_links(
        RequestId,
        Tracing,
        Metrics,
        ErrorMapping,
        tracer_provider=traces.provider,
        registry=CollectorRegistry(),
    )
    async with running(links, course=course) as (_, channel):
        stub = course_pb2_grpc.CourseServiceStub(channel)
        await stub.GetCourse(get_course(), metadata=(("x-request-id", "req-access-1"),))
        course.script.fail_times, course.script.fail_code = 1, grpc.StatusCode.NOT_FOUND
        with pytest.raises(aio.AioRpcError):
            await stub.GetCourse(get_course(), metadata=(("x-request-id", "req-access-2"),))
    ok, failed = access_lines.objects()
    ok_span, failed_span = traces.spans()
    assert ok["logger"] == "learnmesh.access"
    assert ok["level"] == "INFO"
    assert ISO_TIME.fullmatch(ok["time"])
    assert ok["request_id"] == "req-access-1"
    assert ok["trace_id"] == hex_of(ok_span.context.trace_id)
    assert ok["span_id"] == f"{ok_span.context.span_id:016x}"
    assert ok["peer"] == "127.0.0.1"
    assert ok["method"] == f"/{GET_COURSE}"
    assert ok["status"] == "OK"
    assert isinstance(ok["duration_ms"], float)
    assert 0 < ok["duration_ms"] < 5000
    assert "peer_identity" not in ok  # plaintext: no mTLS identity to report
    assert ok["message"].startswith(f"/{GET_COURSE} OK ")
    assert failed["request_id"] == "req-access-2"
    assert failed["status"] == "NOT_FOUND"
    assert failed["trace_id"] == hex_of(failed_span.context.trace_id)
    assert failed["trace_id"] != ok["trace_id"]


async def test_access_log_is_skipped_when_off_or_the_logger_is_quiet(
    access_lines: Lines,
) -> None:
    registry = CollectorRegistry()
    async with running([Metrics(registry, access_log=False)]) as (_, channel):
        await course_pb2_grpc.CourseServiceStub(channel).GetCourse(get_course())
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.WARNING)
    async with running([Metrics(registry)]) as (_, channel):
        await course_pb2_grpc.CourseServiceStub(channel).GetCourse(get_course())
    assert access_lines.lines == []
    handled = {
        "grpc_type": "unary",
        "grpc_service": COURSE,
        "grpc_method": "GetCourse",
        "grpc_code": "OK",
    }
    assert registry.get_sample_value("grpc_server_handled_total", handled) == 2


async def test_setup_logging_lines_written_during_a_call_carry_its_ids(traces: Traces) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    root_level = root.level
    access_level = logging.getLogger(ACCESS_LOGGER).level
    switches = (logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    handler = logs.setup_logging("INFO", stream=stream)
    try:
        logging.getLogger("tests.outside").info("no call here")
        b_course = CourseDouble()
        async with running([Tracing(traces.provider)], course=b_course) as (b, _):
            b_channel = aio.insecure_channel(
                b.address, interceptors=for_every_kind([ClientTracing(traces.provider)])
            )
            links = chain_links(
                RequestId,
                Tracing,
                Metrics,
                tracer_provider=traces.provider,
                registry=CollectorRegistry(),
            )
            async with running(links, course=Relay(b_channel)) as (_, channel):
                await course_pb2_grpc.CourseServiceStub(channel).GetCourse(
                    get_course(), metadata=(("x-request-id", "req-logged"),)
                )
            await b_channel.close()
    finally:
        root.removeHandler(handler)
        handler.close()  # writes what is queued, then stops the writer thread
        root.setLevel(root_level)
        logging.getLogger(ACCESS_LOGGER).setLevel(access_level)
        logging.logThreads, logging.logProcesses, logging.logMultiprocessing = switches
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    outside = next(line for line in lines if line["logger"] == "tests.outside")
    assert "request_id" not in outside and "trace_id" not in outside
    relay = next(line for line in lines if line["logger"] == "tests.relay")
    a_server = next(s for s in traces.spans() if s.kind is SpanKind.SERVER and s.parent is None)
    assert relay["message"] == "asking B"
    assert relay["level"] == "INFO"
    assert relay["course_id"] == COURSE_ID  # extra fields are kept
    assert relay["request_id"] == "req-logged"
    assert relay["trace_id"] == hex_of(a_server.context.trace_id)
    assert relay["span_id"] == f"{a_server.context.span_id:016x}"
    (access,) = [line for line in lines if line["logger"] == "learnmesh.access"]
    assert access["request_id"] == "req-logged"
    assert access["trace_id"] == relay["trace_id"]


class StalledStream(io.StringIO):
    """A stream whose writes wait until released, like a pipe nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait(10)
        return super().write(text)


def test_a_stalled_stream_drops_lines_instead_of_piling_them_up() -> None:
    stream = StalledStream()
    writer = logs.LineWriter(stream, max_queued=5)
    started = time.monotonic()
    for i in range(50):
        writer.put(f"line {i}\n")
    assert time.monotonic() - started < 0.5  # logging never waited for the stream
    stream.release.set()
    writer.stop()
    text = stream.getvalue()
    kept = [line for line in text.splitlines() if line.startswith("line ")]
    assert 5 <= len(kept) < 50
    (notice,) = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert notice["message"] == f"{50 - len(kept)} log lines dropped"


def test_text_logging_keeps_the_ids() -> None:
    record = logging.LogRecord("x", logging.INFO, "", 0, "hello %s", ("you",), None)
    record.request_id = "req-text"
    line = logs.TextFormatter().format(record)
    assert line.endswith("INFO x: hello you [request=req-text]")


# --- setting up tracing from OTEL_* ------------------------------------------------------------


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    return monkeypatch


def processors(provider: TracerProvider) -> tuple[Any, ...]:
    # The SDK keeps them privately; the count is what "no exporter" means.
    return tuple(provider._active_span_processor._span_processors)


def test_unset_exporter_means_none_and_defaults_apply(otel_env: pytest.MonkeyPatch) -> None:
    provider = telemetry.setup_tracing("svc-default", set_global=False)
    assert processors(provider) == ()
    assert SpanStarter(provider, TRACER_NAME).path is not None  # the tracing links' fast path
    assert provider.resource.attributes["service.name"] == "svc-default"
    assert provider.sampler.get_description().startswith("ParentBased{root:AlwaysOnSampler")
    provider.shutdown()
    otel_env.setenv("OTEL_TRACES_EXPORTER", "none")
    provider = telemetry.setup_tracing("svc-default", set_global=False)
    assert processors(provider) == ()
    provider.shutdown()


def test_sampler_and_resource_come_from_the_environment(otel_env: pytest.MonkeyPatch) -> None:
    otel_env.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    otel_env.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    otel_env.setenv("OTEL_SERVICE_NAME", "from-env")
    otel_env.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    provider = telemetry.setup_tracing("svc-given", set_global=False)
    assert "TraceIdRatioBased{0.25}" in provider.sampler.get_description()
    assert provider.resource.attributes["service.name"] == "from-env"
    assert provider.resource.attributes["deployment.environment"] == "test"
    provider.shutdown()


def test_console_exporter_prints_spans_promptly(
    otel_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    otel_env.setenv("OTEL_TRACES_EXPORTER", "console")
    provider = telemetry.setup_tracing("svc-console", set_global=False)
    provider.get_tracer("tests").start_span("hello-console").end()
    deadline = time.monotonic() + 3
    out = ""
    while "hello-console" not in out and time.monotonic() < deadline:
        time.sleep(0.05)
        out += capsys.readouterr().out
    provider.shutdown()
    assert time.monotonic() < deadline, "the span was not printed within 3 s"
    assert '"service.name": "svc-console"' in out + capsys.readouterr().out


def test_otlp_exporter_and_refused_settings(otel_env: pytest.MonkeyPatch) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    otel_env.setenv("OTEL_TRACES_EXPORTER", "otlp")
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    provider = telemetry.setup_tracing("svc-otlp", set_global=False)
    (processor,) = processors(provider)
    assert isinstance(processor.span_exporter, OTLPSpanExporter)
    provider.shutdown()
    otel_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        telemetry.setup_tracing("svc-otlp", set_global=False)
    otel_env.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER: 'zipkin'"):
        telemetry.setup_tracing("svc-otlp", set_global=False)


# --- two processes, as an operator sees it ----------------------------------------------------


def decoded(text: str) -> list[dict[str, Any]]:
    """The JSON objects printed one after another (the console exporter indents them)."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while (start := text.find("{", at)) != -1:
        value, at = decoder.raw_decode(text, start)
        found.append(value)
    return found


async def test_a_and_b_in_separate_processes_share_one_trace_on_the_console(
    traces: Traces,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_TRACES_EXPORTER="console", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    command = python_module("tests.support.double_process", "--traced")
    async with server_process(command, env=env) as b:
        b_channel = aio.insecure_channel(
            b.address,
            interceptors=for_every_kind([ClientTracing(traces.provider), ClientRequestId()]),
        )
        async with running(traced_links(traces.provider), course=Relay(b_channel)) as (_, channel):
            await course_pb2_grpc.CourseServiceStub(channel).GetCourse(
                get_course(), metadata=(("x-request-id", "req-two-processes"),)
            )
        await b_channel.close()
        out, err = await b.stop()
    assert b.proc.returncode == 0, err
    (b_span,) = [s for s in decoded(out) if s.get("name") == GET_COURSE]
    (a_client,) = [s for s in traces.spans() if s.kind is SpanKind.CLIENT]
    assert b_span["kind"] == "SpanKind.SERVER"
    assert b_span["context"]["trace_id"] == f"0x{a_client.context.trace_id:032x}"
    assert b_span["parent_id"] == f"0x{a_client.context.span_id:016x}"
    assert b_span["resource"]["attributes"]["service.name"] == "course-double"
    assert b_span["attributes"]["learnmesh.request_id"] == "req-two-processes"
    access = [
        line
        for line in (json.loads(raw) for raw in err.splitlines() if raw.startswith("{"))
        if line["logger"] == "learnmesh.access"
    ]
    assert len(access) == 1
    assert access[0]["request_id"] == "req-two-processes"
    assert access[0]["trace_id"] == f"{a_client.context.trace_id:032x}"


def test_access_lines_written_directly_match_the_json_formatter() -> None:
    """The access log's fast path (no LogRecord) writes exactly what JsonFormatter would."""
    from learnmesh.kernel.logs import JsonFormatter, json_line

    fields = {
        "request_id": "req-1",
        "trace_id": "",
        "span_id": "",
        "peer": "127.0.0.1",
        "method": "/learnmesh.user.v1.UserService/GetMe",
        "status": "OK",
        "duration_ms": 1.25,
        "peer_identity": 'spiffe://learnmesh.local/client/"odd"',
    }
    logger = logging.getLogger("learnmesh.access")
    record = logger.makeRecord(
        logger.name, logging.INFO, "", 0, "GetMe OK é", (), None, extra=fields
    )
    expected = JsonFormatter().format(record) + "\n"
    assert json_line(record.created, logger.name, "GetMe OK é", fields) == expected


@pytest.mark.parametrize(
    ("request_id", "trace_id", "span_id", "peer_identity", "user_id"),
    [
        ("req-1", "", "", "", None),
        ("", "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "", "u-1"),
        ("r", "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", 'spiffe://x/"odd"', "ü"),
    ],
)
def test_the_access_line_builder_writes_what_json_line_writes(
    request_id: str, trace_id: str, span_id: str, peer_identity: str, user_id: str | None
) -> None:
    """The metrics link builds its line in one go; it must be the generic line, byte for byte."""
    from interceptors.metrics import access_line
    from learnmesh.kernel.logs import json_line

    method = "/learnmesh.user.v1.UserService/GetMe"
    fields: dict[str, Any] = {
        "request_id": request_id,
        "trace_id": trace_id,
        "span_id": span_id,
        "peer": "::1",
        "method": method,
        "status": "NOT_FOUND",
        "duration_ms": 0.125,
    }
    if peer_identity:
        fields["peer_identity"] = peer_identity
    if user_id is not None:
        fields["user_id"] = user_id
    created = time.time()
    expected = json_line(created, "learnmesh.access", f"{method} NOT_FOUND 0.125 ms", fields)
    built = access_line(
        created,
        json.dumps(method),
        "NOT_FOUND",
        0.125,
        request_id,
        trace_id,
        span_id,
        "::1",
        peer_identity,
        user_id,
    )
    assert built == expected
