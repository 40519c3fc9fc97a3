"""Spans for the tracing links, made as the OpenTelemetry SDK would make them, at a fraction
of the cost.

The SDK's ``Tracer.start_span`` costs several microseconds even for a span its sampler
drops, and a recorded ``Span`` about 12 µs to start and end (a sampler call, a lock, bounded
containers that re-check every attribute value, a copy at the end), which grows about
threefold with the caches as cold as they are inside a busy server. The links make a span
per call, so ``SpanStarter`` takes the SDK's decisions itself when it can follow them
exactly, that is for the SDK's standard samplers (parent-based or not; always on, always
off or a trace-id ratio) and span limits that allow the links' own attributes:

- a dropped span is a ``NonRecordingSpan`` made directly (a root's ids are drawn only if
  something asks for them); its trace id, flags and trace state still propagate;
- a sampled span is a ``RecordedSpan``: plain fields while it runs, handed to the
  provider's span processors as the SDK's own ``ReadableSpan`` when it ends. What a handler
  adds to it goes through the SDK's bounded containers under the provider's span limits, so
  processors and exporters receive what the SDK would have given them.

Any other sampler or set-up: the SDK makes every span. Not followed on the fast path: the
SDK's experimental per-tracer configurator (private API), and its internal span metrics
(``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED`` turns the fast path off).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from time import time_ns
from typing import Any

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.environment_variables import OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.util import types

_logger = logging.getLogger(__name__)

_NO_STATE = TraceState()
_UNSET = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags.SAMPLED
_RANDOM = TraceFlags.RANDOM_TRACE_ID
# The flags of a span, made once, by (sampled?, random trace id bit).
_FLAGS = {
    (sampled, bit): TraceFlags((_SAMPLED if sampled else 0) | bit)
    for sampled in (False, True)
    for bit in (0, _RANDOM)
}
_random = random.random
_getrandbits = random.getrandbits
_randbelow = random.randrange
_LOW_64 = TraceIdRatioBased.TRACE_ID_LIMIT
_EVERYTHING = TraceIdRatioBased.TRACE_ID_LIMIT + 1
# Attribute values the SDK keeps exactly as given when no length limit applies.
_PLAIN_VALUES = frozenset({str, int, float, bool})
# The fast path stores the links' own attributes without the SDK's checks; it needs limits
# that could never drop or cut one of them.
_FEWEST_ATTRIBUTES = 32


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
    plain = _ratio_bound(sampler)
    if plain is not None:
        return plain, plain
    # ParentBased keeps its delegates in private fields; anything but the defaults for the
    # four kinds of parent, or a field that is not there, leaves the decision to the SDK.
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


def _plain_limits(limits: SpanLimits) -> bool:
    """Limits under which the links' own few attributes are kept exactly as given."""
    if limits.max_span_attribute_length is not None:
        return False
    count = limits.max_span_attributes
    return count is None or count >= _FEWEST_ATTRIBUTES


def _internal_metrics_on() -> bool:
    return os.environ.get(OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED, "").strip().lower() == "true"


@dataclass(frozen=True)
class FastPath:
    """What SpanStarter needs to decide and record spans for one SDK tracer as it would."""

    tracer: sdk_trace.Tracer
    root_bound: int
    root_rate: float
    child_bound: int | None  # None: a child is sampled when its parent is
    random_ids: int  # the RANDOM_TRACE_ID bit a root's flags carry, or 0
    new_trace_id: Callable[[], int]
    new_span_id: Callable[[], int]
    # With the SDK's RandomIdGenerator, a root's decision is a coin of the same odds, and
    # its trace id is drawn (from the ids that decision allows) only when needed.
    lazy: bool
    limits: SpanLimits
    max_attributes: int
    scope: Any
    on_start: Callable[..., None]
    on_ending: Callable[[Any], None]
    on_end: Callable[[ReadableSpan], None]

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


def fast_path(tracer: trace.Tracer) -> FastPath | None:
    """How SpanStarter may make spans for ``tracer``, or None if only the SDK can."""
    if not isinstance(tracer, sdk_trace.Tracer) or _internal_metrics_on():
        return None
    bounds = _bounds(getattr(tracer, "sampler", None))
    limits = getattr(tracer, "_span_limits", None)
    scope = getattr(tracer, "_instrumentation_scope", None)
    processor = getattr(tracer, "span_processor", None)
    ids = getattr(tracer, "id_generator", None)
    if bounds is None or scope is None or processor is None or ids is None:
        return None
    if not isinstance(limits, SpanLimits) or not _plain_limits(limits):
        return None
    on_ending = getattr(processor, "_on_ending", None) or (lambda _span: None)
    root_bound = bounds[0]
    return FastPath(
        tracer=tracer,
        root_bound=root_bound,
        root_rate=root_bound / _EVERYTHING,
        child_bound=bounds[1],
        random_ids=_RANDOM if ids.is_trace_id_random() else 0,
        new_trace_id=ids.generate_trace_id,
        new_span_id=ids.generate_span_id,
        lazy=type(ids) is RandomIdGenerator,
        limits=limits,
        max_attributes=2**63 if limits.max_span_attributes is None else limits.max_span_attributes,
        scope=scope,
        on_start=processor.on_start,
        on_ending=on_ending,
        on_end=processor.on_end,
    )


class DroppedRoot(NonRecordingSpan):
    """A root span the sampler dropped, whose ids are drawn when first asked for (by a
    child span, an outbound call or a log line): a call nobody looks into pays for none."""

    def __init__(self, path: FastPath) -> None:  # no super(): the context comes later
        self._path = path
        self._context: SpanContext | None = None  # type: ignore[assignment]

    def get_span_context(self) -> SpanContext:
        found = self._context
        if found is None:
            path = self._path
            found = self._context = SpanContext(
                path.root_trace_id(False),
                path.new_span_id(),
                False,
                _FLAGS[False, path.random_ids],
                _NO_STATE,
            )
        return found


class RecordedSpan(trace.Span, ReadableSpan):
    """A sampled span, as the SDK's ``Span`` would record it, in plain fields.

    Like the SDK's Span it is also a ``ReadableSpan`` (processors' ``on_start`` read it as
    one); its fields are ReadableSpan's own, set here without that class's constructor.
    Values the SDK keeps as they are (str, int, float, bool, with no length limit, under
    the count limit) are stored directly; anything else turns the attributes into the SDK's
    BoundedAttributes, which cleans, cuts and counts as the SDK does. Events and links
    always go through the SDK's containers.
    """

    def __init__(
        self,
        path: FastPath,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, types.AnyValue],
    ) -> None:
        self._path = path
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes: dict[str, types.AnyValue] | BoundedAttributes = attributes
        self._events: Sequence[Event] = ()
        self._links: Sequence[Link] = ()
        self._status = _UNSET
        self._resource = path.tracer.resource
        self._instrumentation_scope = path.scope
        self._instrumentation_info = path.tracer.instrumentation_info
        self._start_time: int | None = time_ns()
        self._end_time: int | None = None

    def __repr__(self) -> str:
        return f'{type(self).__name__}(name="{self._name}", context={self._context})'

    def get_span_context(self) -> SpanContext:
        return self._context  # type: ignore[return-value]  # always set, unlike ReadableSpan's

    def is_recording(self) -> bool:
        return self._end_time is None

    def _ended(self, what: str) -> bool:
        if self._end_time is None:
            return False
        _logger.warning("Tried calling %s on an ended span.", what)
        return True

    def _bounded(self) -> BoundedAttributes:
        attributes = self._attributes
        if type(attributes) is dict:
            limits = self._path.limits
            attributes = self._attributes = BoundedAttributes(
                limits.max_span_attributes,
                attributes,
                immutable=False,
                max_value_len=limits.max_span_attribute_length,
            )
        return attributes  # type: ignore[return-value]

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self._ended("set_attribute"):
            return
        attributes = self._attributes
        if (
            type(attributes) is dict
            and type(value) in _PLAIN_VALUES
            and type(key) is str
            and key
            and (key in attributes or len(attributes) < self._path.max_attributes)
        ):
            attributes.pop(key, None)  # as the SDK does: a key set again moves to the end
            attributes[key] = value
        else:
            self._bounded()[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self,
        name: str,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
    ) -> None:
        if self._ended("add_event"):
            return
        limits = self._path.limits
        if not isinstance(self._events, BoundedList):
            self._events = BoundedList(limits.max_events)
        bounded = self._frozen(attributes, limits.max_event_attributes)
        self._events.append(Event(name=name, attributes=bounded, timestamp=timestamp))

    def add_link(self, context: SpanContext | None, attributes: types.Attributes = None) -> None:
        if not (context and (context.is_valid or attributes or context.trace_state)):
            return  # the SDK's rule: such a link says nothing
        if self._ended("add_link"):
            return
        limits = self._path.limits
        if not isinstance(self._links, BoundedList):
            self._links = BoundedList(limits.max_links)
        self._links.append(Link(context, self._frozen(attributes, limits.max_link_attributes)))

    def _frozen(self, attributes: types.Attributes, count: int | None) -> BoundedAttributes:
        """An event's or a link's attributes, cleaned and cut as the SDK does."""
        limits = self._path.limits
        return BoundedAttributes(
            count, attributes, max_value_len=limits.max_attribute_length, immutable=True
        )

    def update_name(self, name: str) -> None:
        if not self._ended("update_name"):
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """The SDK's rules: OK is final, UNSET is never set."""
        if self._ended("set_status") or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is StatusCode.UNSET:
                return
            if description is not None:
                _logger.warning(
                    "Description %s ignored. Use either `Status` or `(StatusCode, Description)`",
                    description,
                )
            self._status = status
        elif status is not StatusCode.UNSET:
            self._status = Status(status, description)

    # The SDK's own: it needs nothing of the span but add_event.
    record_exception = sdk_trace.Span.record_exception

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            _logger.warning("Calling end() on an ended span.")
            return
        self._end_time = end_time if end_time is not None else time_ns()
        path = self._path
        path.on_ending(self)
        path.on_end(
            ReadableSpan(
                name=self._name,
                context=self._context,
                parent=self._parent,
                resource=self._resource,
                attributes=self._attributes,
                events=self._events,
                links=self._links,
                kind=self._kind,
                status=self._status,
                instrumentation_info=self._instrumentation_info,
                start_time=self._start_time,
                end_time=self._end_time,
                instrumentation_scope=self._instrumentation_scope,
            )
        )


class SpanStarter:
    """Starts spans as the provider's SDK tracer would (see the module's docstring)."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None,
        tracer_name: str,
        kept_attributes: Callable[[Any], dict[str, str]] | None = None,
        *,
        sdk_spans: bool = False,
    ) -> None:
        provider = tracer_provider or trace.get_tracer_provider()
        self.tracer = provider.get_tracer(tracer_name)
        # sdk_spans (LEARNMESH_TELEMETRY_SDK_SPANS): the SDK makes every span, no fast path.
        self.path = None if sdk_spans else fast_path(self.tracer)
        # Attributes that cost something to find (kept_attributes(source)): made only for
        # spans that are kept (on the fast path), and given at their start.
        self.kept_attributes = kept_attributes

    @property
    def lazy_path(self) -> FastPath | None:
        """The fast path when a root's coin alone decides (the SDK's random ids): roots are
        dropped when ``random.random()`` is at least its ``root_rate`` (``kept_root`` makes
        those it keeps); None: ask ``start_root``. For a caller that tosses the coin itself
        on its hottest path."""
        path = self.path
        return path if path is not None and path.lazy else None

    def start_root(
        self,
        name: str,
        kind: SpanKind,
        parent_context: Context,
        attributes: dict[str, str],
        source: Any = None,
    ) -> trace.Span:
        """A span that starts a new trace (``parent_context`` holds no valid span)."""
        path = self.path
        if path is None:
            return self._sdk_span(name, kind, parent_context, attributes, source)
        if path.lazy:
            if _random() >= path.root_rate:
                return DroppedRoot(path)
            return self.kept_root(name, kind, parent_context, attributes, source)
        trace_id = path.new_trace_id()
        if trace_id & _LOW_64 >= path.root_bound:
            flags = _FLAGS[False, path.random_ids]
            return NonRecordingSpan(
                SpanContext(trace_id, path.new_span_id(), False, flags, _NO_STATE)
            )
        flags = _FLAGS[True, path.random_ids]
        return self._recorded(
            path, name, kind, parent_context, None, trace_id, flags, _NO_STATE, attributes, source
        )

    def kept_root(
        self,
        name: str,
        kind: SpanKind,
        parent_context: Context,
        attributes: dict[str, str],
        source: Any = None,
    ) -> RecordedSpan:
        """A new trace's span that the coin of ``lazy_path`` kept: its trace id is
        drawn from the ids that decision allows."""
        path = self.path
        assert path is not None and path.lazy
        flags = _FLAGS[True, path.random_ids]
        trace_id = path.root_trace_id(True)
        return self._recorded(
            path, name, kind, parent_context, None, trace_id, flags, _NO_STATE, attributes, source
        )

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
        path = self.path
        if path is None:
            return self._sdk_span(name, kind, parent_context, attributes, source)
        if parent is None:
            return self.start_root(name, kind, parent_context, attributes, source)
        trace_id, state = parent.trace_id, parent.trace_state
        random_bit, bound = parent.trace_flags & _RANDOM, path.child_bound
        if not ((parent.trace_flags & _SAMPLED) if bound is None else trace_id & _LOW_64 < bound):
            flags = _FLAGS[False, random_bit]
            return NonRecordingSpan(SpanContext(trace_id, path.new_span_id(), False, flags, state))
        flags = _FLAGS[True, random_bit]
        return self._recorded(
            path, name, kind, parent_context, parent, trace_id, flags, state, attributes, source
        )

    def _recorded(
        self,
        path: FastPath,
        name: str,
        kind: SpanKind,
        parent_context: Context,
        parent: SpanContext | None,
        trace_id: int,
        flags: TraceFlags,
        state: TraceState,
        attributes: dict[str, str],
        source: Any,
    ) -> RecordedSpan:
        """A span the sampler keeps, started as the SDK starts one (processors told)."""
        kept = self.kept_attributes
        span = RecordedSpan(
            path,
            name,
            SpanContext(trace_id, path.new_span_id(), False, flags, state),
            parent,
            kind,
            {**attributes, **kept(source)} if kept is not None else dict(attributes),
        )
        path.on_start(span, parent_context=parent_context)
        return span

    def _sdk_span(
        self,
        name: str,
        kind: SpanKind,
        parent_context: Context,
        attributes: dict[str, str],
        source: Any,
    ) -> trace.Span:
        """A span the SDK decides about and makes, seeing every attribute from its start (the
        sampler may want them), as the fast path's processors do."""
        if self.kept_attributes is not None:
            attributes = {**attributes, **self.kept_attributes(source)}
        return self.tracer.start_span(name, parent_context, kind, attributes)
