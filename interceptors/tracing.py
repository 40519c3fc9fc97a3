"""Tracing: an OpenTelemetry SERVER span per call and a CLIENT span per outbound call.

The server link reads W3C ``traceparent``/``tracestate`` from the call metadata, starts a
span named ``package.Service/Method`` with the ``rpc.*`` attributes, keeps it current while
the handler runs (so the handler's outbound calls become its children and its log lines
carry the trace id) and ends it with the final status code. The client side starts a child
span of whatever is current and injects ``traceparent``/``tracestate`` into the metadata.

It is built for the hot path (the stock opentelemetry-instrumentation-grpc interceptor costs
a large share of a trivial call; benchmarks.run measures the links' cost against a bare
server, with results in benchmarks/RESULTS.md): names and attribute dicts are made once per
method, ``traceparent`` is parsed only when present, spans are made by
``interceptors.spans.SpanStarter`` (the SDK's decisions and records, without the SDK's
cost), and a call whose span the sampler dropped has nothing to end, which matters at low
sampling rates, where most calls are dropped.

Propagation follows ``OTEL_PROPAGATORS`` (read when a link is made; default
``tracecontext,baggage``). Names within ``tracecontext`` and ``baggage`` are handled here:
``traceparent``/``tracestate`` by the parser below, W3C ``baggage`` by the API's
W3CBaggagePropagator (only when the header is there: inbound baggage is in the context
the handler runs in, and outbound calls carry the current context's baggage); a name left
out is neither read nor sent, and ``none`` turns propagation off. Any other name (``b3``,
``b3multi``, ``jaeger``, …) hands extraction and injection to OpenTelemetry's global
propagator (``opentelemetry.propagate``, which loads those names from the same variable;
their packages must be installed).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from grpc import aio
from opentelemetry import baggage, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from interceptors.call_state import call_metadata
from interceptors.client import ClientConcern, method_name, replace_details
from interceptors.link import Behavior, ServerLink
from interceptors.method import MethodInfo, split
from interceptors.outcome import observe
from interceptors.spans import DroppedRoot, SpanStarter
from learnmesh.kernel import principal
from learnmesh.kernel.tracecontext import attach, context_of, current_context

TRACER_NAME = "learnmesh.interceptors.tracing"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
BAGGAGE = "baggage"
# What OTEL_PROPAGATORS may name for the links' own W3C handling; anything else goes to
# OpenTelemetry's global propagator.
W3C_PROPAGATORS = frozenset({"tracecontext", "baggage"})
DEFAULT_PROPAGATORS = ("tracecontext", "baggage")
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
_random = random.random
_BAGGAGE = W3CBaggagePropagator()


def propagators_from_env(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The propagator names of ``OTEL_PROPAGATORS`` (lower case), or the default pair."""
    raw = (os.environ if env is None else env).get("OTEL_PROPAGATORS", "")
    names = tuple(name.strip().lower() for name in raw.split(",") if name.strip())
    return names or DEFAULT_PROPAGATORS


class Propagation:
    """What a link reads from and writes to call metadata, for a list of propagator names."""

    def __init__(self, names: Sequence[str] | None = None) -> None:
        names = tuple(n.lower() for n in (propagators_from_env() if names is None else names))
        self.names = names
        off = "none" in names
        # Names beyond the W3C pair: the global propagator does all of it (no fast parsing).
        self.use_global = not off and not set(names) <= W3C_PROPAGATORS
        self.tracecontext = not off and not self.use_global and "tracecontext" in names
        self.baggage = not off and not self.use_global and "baggage" in names


def _in_context(span: trace.Span, base: Context) -> Context:
    """A context holding ``span`` and whatever ``base`` holds (baggage)."""
    return context_of(span) if base is _ROOT else trace.set_span_in_context(span, base)


def _carrier(metadata: Any) -> dict[str, str]:
    """Call metadata as a propagator's carrier (text values; the last of a repeated key)."""
    return {key: value for key, value in metadata or () if isinstance(value, str)}


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


def _call_attributes(context: aio.ServicerContext[Any, Any]) -> dict[str, str]:
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

    needs_request = False  # the request message is not looked at

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        sdk_spans: bool = False,
        propagators: Sequence[str] | None = None,
    ) -> None:
        self.starter = SpanStarter(
            tracer_provider, TRACER_NAME, _call_attributes, sdk_spans=sdk_spans
        )
        self.propagation = Propagation(propagators)

    def wrap(self, method: MethodInfo, behavior: Behavior) -> Behavior:
        # Everything a call needs is bound here, once per method: the hot path below is a
        # metadata scan, one span, a context attach and, for sampled spans only, the
        # attribute work and the end.
        starter = self.starter
        start, start_root, kept_root = starter.start, starter.start_root, starter.kept_root
        # Nine calls in ten at 10 % sampling are roots the coin drops: the coin is tossed
        # here, and such a call costs a coin, one span object and a context to attach.
        lazy = starter.lazy_path
        span_name = method.full_method.lstrip("/")
        attributes = _rpc_attributes(method.service, method.name)
        server = SpanKind.SERVER
        propagation = self.propagation
        # Keys that OTEL_PROPAGATORS leaves out match no metadata key ("").
        traceparent_key = TRACEPARENT if propagation.tracecontext else ""
        tracestate_key = TRACESTATE if propagation.tracecontext else ""
        baggage_key = BAGGAGE if propagation.baggage else ""

        def begin(context: aio.ServicerContext[Any, Any]) -> trace.Span | None:
            """The call's span, made current; None when it was dropped (nothing to end)."""
            traceparent = tracestate = baggage_header = None
            for key, value in call_metadata(context):
                if key == traceparent_key:
                    traceparent = value
                elif key == tracestate_key:
                    tracestate = value
                elif key == baggage_key:
                    baggage_header = value
            base = _ROOT
            if baggage_header is not None:
                base = _BAGGAGE.extract({BAGGAGE: baggage_header}, context=_ROOT)
            # Never detached: grpc.aio runs each call in a task of its own, and the task's
            # context (the span in it) ends with the call.
            parent = None if traceparent is None else parse_traceparent(traceparent, tracestate)
            if parent is not None:
                parent_context = _in_context(NonRecordingSpan(parent), base)
                span = start(span_name, server, parent_context, parent, attributes, context)
            elif lazy is None:
                span = start_root(span_name, server, base, attributes, context)
            elif _random() >= lazy.root_rate:
                attach(_in_context(DroppedRoot(lazy), base))
                return None
            else:
                span = kept_root(span_name, server, base, attributes, context)
            attach(_in_context(span, base))
            return span if span.is_recording() else None

        def begin_global(context: aio.ServicerContext[Any, Any]) -> trace.Span | None:
            """As ``begin``, with OpenTelemetry's global propagator reading the metadata."""
            base = propagate.extract(_carrier(call_metadata(context)), context=_ROOT)
            found = trace.get_current_span(base).get_span_context()
            if found.is_valid:
                span = start(span_name, server, base, found, attributes, context)
            else:
                span = start_root(span_name, server, base, attributes, context)
            attach(trace.set_span_in_context(span, base))
            return span if span.is_recording() else None

        def end(
            span: trace.Span,
            context: aio.ServicerContext[Any, Any],
            code: grpc.StatusCode,
            exc: BaseException | None,
        ) -> None:
            """The final status, on a recorded span (a dropped one has nothing to end)."""
            identity = principal.call_info().peer_identity
            if identity:  # known only now: the peer identity link runs inside this one
                span.set_attributes({STATUS_CODE: code.value[0], PEER_IDENTITY: identity})
            else:
                span.set_attribute(STATUS_CODE, code.value[0])
            if code in SERVER_ERRORS:
                span.set_status(Status(StatusCode.ERROR, _description(code, context, exc)))
            span.end()

        return observe(method, behavior, begin_global if propagation.use_global else begin, end)


def _description(
    code: grpc.StatusCode, context: aio.ServicerContext[Any, Any], exc: BaseException | None
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

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        sdk_spans: bool = False,
        propagators: Sequence[str] | None = None,
    ) -> None:
        self.starter = SpanStarter(tracer_provider, TRACER_NAME, sdk_spans=sdk_spans)
        self.propagation = Propagation(propagators)
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
        current = current_context()
        found = trace.get_current_span(current).get_span_context()
        parent = found if found.is_valid else None
        span = self.starter.start(span_name, SpanKind.CLIENT, current, parent, attributes)
        propagation = self.propagation
        carrier: dict[str, str] = {}
        if propagation.use_global:
            textmap = propagate.get_global_textmap()
            textmap.inject(carrier, context=trace.set_span_in_context(span, current))
            return _with_fields(details, carrier, textmap.fields), span
        if propagation.baggage and baggage.get_all(current):
            _BAGGAGE.inject(carrier, context=current)
        span_context = span.get_span_context()
        if not (span_context.is_valid and propagation.tracecontext):
            return (_with_fields(details, carrier, (BAGGAGE,)) if carrier else details), span
        replaced = (TRACEPARENT, TRACESTATE, BAGGAGE) if carrier else (TRACEPARENT, TRACESTATE)
        pairs = [(key, value) for key, value in details.metadata or () if key not in replaced]
        pairs.append((TRACEPARENT, traceparent_of(span_context)))
        if span_context.trace_state:
            pairs.append((TRACESTATE, span_context.trace_state.to_header()))
        pairs.extend(carrier.items())
        return replace_details(details, metadata=aio.Metadata(*pairs)), span

    def after(self, details: aio.ClientCallDetails, token: Any, code: grpc.StatusCode) -> None:
        span: trace.Span = token
        if span.is_recording():
            span.set_attribute(STATUS_CODE, code.value[0])
            if code is not _OK:
                span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()


def _with_fields(
    details: aio.ClientCallDetails, carrier: Mapping[str, str], fields: Any
) -> aio.ClientCallDetails:
    """``details`` with the propagator's ``fields`` replaced by what ``carrier`` holds."""
    drop = set(fields) | set(carrier)
    pairs = [(key, value) for key, value in details.metadata or () if key not in drop]
    pairs.extend(carrier.items())
    return replace_details(details, metadata=aio.Metadata(*pairs))
