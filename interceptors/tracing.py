"""Tracing: an OpenTelemetry SERVER span per call and a CLIENT span per outbound call.

The server link reads W3C ``traceparent``/``tracestate`` from the call metadata, starts a
span named ``package.Service/Method`` with the ``rpc.*`` attributes, keeps it current while
the handler runs (so the handler's outbound calls become its children and its log lines
carry the trace id) and ends it with the final status code. The client side starts a child
span of whatever is current and injects ``traceparent``/``tracestate`` into the metadata.

It is built for the hot path (opentelemetry-instrumentation-grpc costs 38-49 % of a trivial
call here): names and attribute dicts are made once per method, ``traceparent`` is parsed
only when present, a span the sampler dropped gets no attribute work, and with the SDK's
standard samplers a dropped span is not even made by the SDK (SpanStarter), which matters
at 10 % sampling where nine calls in ten are dropped.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from interceptors.chain import Behavior, ServerLink, call_metadata
from interceptors.client import ClientConcern, method_name, replace_details
from interceptors.method import MethodInfo, split
from interceptors.outcome import observe
from learnmesh import principal

TRACER_NAME = "learnmesh.interceptors.tracing"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
STATUS_CODE = "rpc.grpc.status_code"
PEER_IDENTITY = "learnmesh.peer_identity"

# https://www.w3.org/TR/trace-context/#traceparent-header-field-values
_TRACEPARENT = re.compile(
    r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^ \t]*)?[ \t]*"
)
# Codes that mean the server failed (OpenTelemetry's gRPC conventions); other codes are
# the caller's problem and leave a server span's status unset.
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_OK = grpc.StatusCode.OK
# The parent of a call that brought no trace context: a new trace, whatever the task
# running the handler happened to inherit.
_ROOT = Context()
_NO_STATE = TraceState()
_SAMPLED = TraceFlags.SAMPLED
_RANDOM = TraceFlags.RANDOM_TRACE_ID
_random = random.random
_getrandbits = random.getrandbits
_randbelow = random.randrange
# Flags of dropped spans, made once: no random-id bit, and with it.
_DROPPED_FLAGS = {0: TraceFlags(0), _RANDOM: TraceFlags(_RANDOM)}
_LOW_64 = TraceIdRatioBased.TRACE_ID_LIMIT
_EVERYTHING = TraceIdRatioBased.TRACE_ID_LIMIT + 1


def parse_traceparent(traceparent: str, tracestate: str | None) -> SpanContext | None:
    """The caller's span context, or None when the header is malformed (W3C: a bad
    traceparent starts a new trace)."""
    found = _TRACEPARENT.fullmatch(traceparent)
    if found is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = found.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id = int(trace_hex, 16)
    span_id = int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    state = TraceState.from_header([tracestate]) if tracestate else None
    return SpanContext(
        trace_id,
        span_id,
        is_remote=True,
        trace_flags=TraceFlags(int(flags_hex, 16)),
        trace_state=state,
    )


class StagedIds(IdGenerator):
    """The SDK's random ids, except that the tracing links can hand over the trace id they
    already drew for a root span they decided to sample (see SpanStarter).

    ``learnmesh.telemetry.setup_tracing`` gives its provider one; a provider without it
    still works, through the SDK's own (slower) path for every span.
    """

    def __init__(self, inner: IdGenerator | None = None) -> None:
        self.inner = inner or RandomIdGenerator()
        self._staged = threading.local()

    def stage(self, trace_id: int | None) -> None:
        self._staged.trace_id = trace_id

    def generate_trace_id(self) -> int:
        staged: int | None = getattr(self._staged, "trace_id", None)
        if staged is not None:
            self._staged.trace_id = None
            return staged
        return self.inner.generate_trace_id()

    def generate_span_id(self) -> int:
        return self.inner.generate_span_id()

    def is_trace_id_random(self) -> bool:
        return self.inner.is_trace_id_random()


def _ratio_bound(sampler: Sampler | None) -> int | None:
    """Trace ids whose low 64 bits are below this are sampled; None: not a ratio rule."""
    if sampler is ALWAYS_ON:
        return _EVERYTHING
    if sampler is ALWAYS_OFF:
        return 0
    if type(sampler) is TraceIdRatioBased:
        return sampler.bound
    return None


def _bounds(sampler: Sampler | None) -> tuple[int, int | None] | None:
    """(root bound, child bound or None to follow the parent's flag) for the SDK's standard
    samplers; None for any other (the SDK then decides every span itself)."""
    if sampler is ALWAYS_ON:
        return None  # nothing is ever dropped: there is no cheaper path to take
    plain = _ratio_bound(sampler)
    if plain is not None:
        return plain, plain
    delegates = (
        ("_remote_parent_sampled", ALWAYS_ON),
        ("_remote_parent_not_sampled", ALWAYS_OFF),
        ("_local_parent_sampled", ALWAYS_ON),
        ("_local_parent_not_sampled", ALWAYS_OFF),
    )
    if type(sampler) in (ParentBased, ParentBasedTraceIdRatio) and all(
        getattr(sampler, name, None) is expected for name, expected in delegates
    ):
        root = _ratio_bound(getattr(sampler, "_root", None))
        if root is not None:
            return root, None
    return None


@dataclass(frozen=True)
class _DropRule:
    root_bound: int
    child_bound: int | None  # None: a child is sampled when its parent is
    root_flags: TraceFlags
    ids: StagedIds
    new_trace_id: Callable[[], int]
    new_span_id: Callable[[], int]
    # With the SDK's RandomIdGenerator underneath, a root's decision is a coin of the same
    # odds, and its trace id is drawn (from the ids that decision allows) only when needed.
    lazy: bool

    @property
    def root_rate(self) -> float:
        return self.root_bound / _EVERYTHING

    def root_trace_id(self, sampled: bool) -> int:
        """A random trace id whose low 64 bits fall on the ``sampled`` side of the bound,
        distributed exactly as a random id given that decision."""
        bound = self.root_bound
        if not sampled:  # the common case: draws fall on this side most of the time
            while True:
                trace_id = _getrandbits(128)
                if trace_id & _LOW_64 >= bound:
                    return trace_id
        while True:
            if bound >= _EVERYTHING:  # everything is sampled: any random id will do
                trace_id = _getrandbits(128)
            else:
                trace_id = _getrandbits(64) << 64 | _randbelow(bound)
            if trace_id:
                return trace_id


def _drop_rule(tracer: trace.Tracer) -> _DropRule | None:
    """How SpanStarter may decide for ``tracer``, or None if only the SDK can."""
    if not isinstance(tracer, sdk_trace.Tracer):
        return None
    ids = getattr(tracer, "id_generator", None)
    bounds = _bounds(getattr(tracer, "sampler", None))
    if not isinstance(ids, StagedIds) or bounds is None:
        return None
    return _DropRule(
        root_bound=bounds[0],
        child_bound=bounds[1],
        root_flags=_DROPPED_FLAGS[_RANDOM if ids.is_trace_id_random() else 0],
        ids=ids,
        new_trace_id=ids.inner.generate_trace_id,
        new_span_id=ids.inner.generate_span_id,
        lazy=type(ids.inner) is RandomIdGenerator,
    )


class _DroppedRoot(NonRecordingSpan):
    """A root span the sampler dropped, whose ids are drawn when first asked for (by a
    child span, an outbound call or a log line): a call nobody looks into pays for none."""

    def __init__(self, rule: _DropRule) -> None:  # no super(): the context comes later
        self._rule = rule
        self._context: SpanContext | None = None  # type: ignore[assignment]

    def get_span_context(self) -> SpanContext:
        found = self._context
        if found is None:
            rule = self._rule
            found = self._context = SpanContext(
                rule.root_trace_id(False), rule.new_span_id(), False, rule.root_flags, _NO_STATE
            )
        return found


class SpanStarter:
    """Starts spans as the SDK would, but cheaply when the sampler drops them.

    The SDK's start_span costs several microseconds even for a span it drops (about three
    times that with the caches as cold as they are inside a busy server). With the SDK's
    standard samplers (parent-based or not; always on, always off or a trace-id ratio)
    and a provider using StagedIds, the decision is taken here by the same rules: a
    dropped span is made directly as a NonRecordingSpan (its trace id, flags and trace
    state still propagate), and a sampled one is left to the SDK with the trace id decided
    here, so both agree. Any other sampler or provider: the SDK decides every span.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None,
        kept_attributes: Callable[[Any], dict[str, str]] | None = None,
    ) -> None:
        provider = tracer_provider or trace.get_tracer_provider()
        self.tracer = provider.get_tracer(TRACER_NAME)
        self.rule = _drop_rule(self.tracer)
        # Attributes that cost something to find (kept_attributes(source)): made only for
        # spans that are kept, and given at their start when the decision is ours.
        self.kept_attributes = kept_attributes

    def start(
        self,
        name: str,
        kind: SpanKind,
        parent_context: Context,
        parent: SpanContext | None,
        attributes: dict[str, str],
        source: Any = None,
    ) -> trace.Span:
        """A span named ``name``, child of ``parent`` (the span of ``parent_context``)."""
        rule = self.rule
        if rule is None:
            return self._sdk_span(name, kind, parent_context, attributes, source)
        if parent is None:
            if rule.lazy:
                if _random() >= rule.root_rate:
                    return _DroppedRoot(rule)
                trace_id = rule.root_trace_id(True)
            else:
                trace_id = rule.new_trace_id()
                if trace_id & _LOW_64 >= rule.root_bound:
                    return NonRecordingSpan(
                        SpanContext(trace_id, rule.new_span_id(), False, rule.root_flags, _NO_STATE)
                    )
            rule.ids.stage(trace_id)
            try:
                return self._kept_span(name, kind, parent_context, attributes, source)
            finally:
                rule.ids.stage(None)
        trace_id = parent.trace_id
        bound = rule.child_bound
        if (parent.trace_flags & _SAMPLED) if bound is None else trace_id & _LOW_64 < bound:
            return self._kept_span(name, kind, parent_context, attributes, source)
        flags, state = _DROPPED_FLAGS[parent.trace_flags & _RANDOM], parent.trace_state
        return NonRecordingSpan(SpanContext(trace_id, rule.new_span_id(), False, flags, state))

    def _kept_span(
        self,
        name: str,
        kind: SpanKind,
        parent_context: Context,
        attributes: dict[str, str],
        source: Any,
    ) -> trace.Span:
        """A span this starter decided to keep (the SDK, deciding alike, records it)."""
        if self.kept_attributes is not None:
            attributes = {**attributes, **self.kept_attributes(source)}
        return self.tracer.start_span(name, parent_context, kind, attributes)

    def _sdk_span(
        self,
        name: str,
        kind: SpanKind,
        parent_context: Context,
        attributes: dict[str, str],
        source: Any,
    ) -> trace.Span:
        """A span the SDK decides about alone; the kept attributes follow if it records."""
        span = self.tracer.start_span(name, parent_context, kind, attributes)
        if self.kept_attributes is not None and span.is_recording():
            span.set_attributes(self.kept_attributes(source))
        return span


def traceparent_of(span_context: SpanContext) -> str:
    return (
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}"
        f"-{span_context.trace_flags & 0xFF:02x}"
    )


def peer_of(peer: str | None) -> tuple[str, int | None]:
    """``ipv4:127.0.0.1:5000`` → (``127.0.0.1``, 5000); ``ipv6:[::1]:5000`` → (``::1``, 5000)."""
    if not peer:
        return "", None
    _, _, rest = peer.partition(":")
    if rest.startswith("["):
        end = rest.find("]")
        address, _, port = rest[1:end], None, rest[end + 2 :]
    else:
        address, _, port = rest.rpartition(":")
        if not address:  # unix:/path and the like: no port
            return rest, None
    return address, int(port) if port and port.isdigit() else None


def _call_attributes(context: aio.ServicerContext) -> dict[str, str]:
    """What a recorded server span learns from the call: the caller's address and the
    request id (set by the request-id link, outside this one)."""
    found: dict[str, str] = {}
    info = principal.call_info()
    # The request-id link has parsed the address already; alone, this link asks grpc.
    address = info.client_address or peer_of(context.peer())[0]
    if address:  # the port of a client's connection says little; it is left out (cost)
        found["network.peer.address"] = address
    if info.request_id:
        found["learnmesh.request_id"] = info.request_id
    return found


def _rpc_attributes(service: str, name: str) -> dict[str, str]:
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


class Tracing(ServerLink):
    """A SERVER span per call; the global tracer provider unless one is given."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self.starter = SpanStarter(tracer_provider, _call_attributes)

    def wrap(self, method: MethodInfo, behavior: Behavior) -> Behavior:
        # Everything a call needs is bound here, once per method: the hot path below is a
        # metadata scan, one span, a context attach and, for sampled spans only,
        # the attribute work.
        start = self.starter.start
        span_name = method.full_method.lstrip("/")
        attributes = _rpc_attributes(method.service, method.name)
        server = SpanKind.SERVER
        attach = otel_context.attach
        in_context = trace.set_span_in_context

        def begin(context: aio.ServicerContext) -> trace.Span:
            traceparent = tracestate = None
            for key, value in call_metadata(context):
                if key == TRACEPARENT:
                    traceparent = value
                elif key == TRACESTATE:
                    tracestate = value
            parent = None if traceparent is None else parse_traceparent(traceparent, tracestate)
            parent_context = (
                _ROOT if parent is None else in_context(NonRecordingSpan(parent), _ROOT)
            )
            span = start(span_name, server, parent_context, parent, attributes, context)
            # Never detached: grpc.aio runs each call in a task of its own, and the task's
            # context (this span in it) ends with the call.
            attach(in_context(span, parent_context))
            return span

        def finish(
            span: trace.Span,
            context: aio.ServicerContext,
            code: grpc.StatusCode,
            exc: BaseException | None,
        ) -> None:
            """Status work for a recorded span (the others have nothing to keep)."""
            identity = principal.call_info().peer_identity
            if identity:  # known only now: the peer identity link runs inside this one
                span.set_attributes({STATUS_CODE: code.value[0], PEER_IDENTITY: identity})
            else:
                span.set_attribute(STATUS_CODE, code.value[0])
            if code in SERVER_ERRORS:
                span.set_status(Status(StatusCode.ERROR, _description(code, context, exc)))

        def end(
            span: trace.Span,
            context: aio.ServicerContext,
            code: grpc.StatusCode,
            exc: BaseException | None,
        ) -> None:
            if span.is_recording():
                finish(span, context, code, exc)
                span.end()

        return observe(method, behavior, begin, end)


def _description(
    code: grpc.StatusCode, context: aio.ServicerContext, exc: BaseException | None
) -> str:
    """The status message the caller saw (already safe: error mapping wrote it), else the
    code; never an unmapped exception's text, which may hold SQL or secrets."""
    if isinstance(exc, aio.AbortError):
        details = context.details()
        if details:
            return f"{code.name}: {details}"
    return code.name


class ClientTracing(ClientConcern):
    """A CLIENT span per outbound call, child of the current span, with the trace context
    injected into the call's metadata."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self.starter = SpanStarter(tracer_provider)
        self._methods: dict[str, tuple[str, dict[str, str]]] = {}

    def _describe(self, method: str) -> tuple[str, dict[str, str]]:
        known = self._methods.get(method)
        if known is None:
            service, name = split(method)
            known = (method.lstrip("/"), _rpc_attributes(service, name))
            if len(self._methods) < 4096:  # method names are finite; stay bounded anyway
                self._methods[method] = known
        return known

    def before(self, details: aio.ClientCallDetails) -> tuple[aio.ClientCallDetails, Any]:
        span_name, attributes = self._describe(method_name(details))
        current = otel_context.get_current()
        found = trace.get_current_span(current).get_span_context()
        parent = found if found.is_valid else None
        span = self.starter.start(span_name, SpanKind.CLIENT, current, parent, attributes)
        span_context = span.get_span_context()
        if not span_context.is_valid:
            return details, span
        pairs = [
            (key, value)
            for key, value in details.metadata or ()
            if key not in (TRACEPARENT, TRACESTATE)
        ]
        pairs.append((TRACEPARENT, traceparent_of(span_context)))
        if span_context.trace_state:
            pairs.append((TRACESTATE, span_context.trace_state.to_header()))
        return replace_details(details, metadata=aio.Metadata(*pairs)), span

    def after(self, details: aio.ClientCallDetails, token: Any, code: grpc.StatusCode) -> None:
        span: trace.Span = token
        if span.is_recording():
            span.set_attribute(STATUS_CODE, code.value[0])
            if code is not _OK:
                span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()
