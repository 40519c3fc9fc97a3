"""When SpanStarter may decide and record spans itself: the SDK's standard samplers
(parent-based or not; always on, always off or a trace-id ratio) and span limits that allow
the links' own attributes, read once per tracer into a ``FastPath``.

Not followed (the SDK then makes every span): any other sampler, the SDK's experimental
per-tracer configurator (private API), and its internal span metrics
(``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED`` turns the fast path off).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.environment_variables import OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import TraceFlags, TraceState

NO_STATE = TraceState()
SAMPLED = TraceFlags.SAMPLED
RANDOM = TraceFlags.RANDOM_TRACE_ID
# The flags of a span, made once, by (sampled?, random trace id bit).
FLAGS = {
    (sampled, bit): TraceFlags((SAMPLED if sampled else 0) | bit)
    for sampled in (False, True)
    for bit in (0, RANDOM)
}
_getrandbits = random.getrandbits
_randbelow = random.randrange
LOW_64 = TraceIdRatioBased.TRACE_ID_LIMIT
_EVERYTHING = TraceIdRatioBased.TRACE_ID_LIMIT + 1
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
                if trace_id & LOW_64 >= bound:
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
        random_ids=RANDOM if ids.is_trace_id_random() else 0,
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
