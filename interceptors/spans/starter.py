"""SpanStarter: starts spans as the provider's SDK tracer would, on the fast path when the
tracer's set-up allows (``fast_path``), else through the SDK."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState

from interceptors.spans.dropped import DroppedRoot
from interceptors.spans.fast_path import (
    FLAGS,
    LOW_64,
    NO_STATE,
    RANDOM,
    SAMPLED,
    FastPath,
    fast_path,
)
from interceptors.spans.recorded import RecordedSpan

_random = random.random


class SpanStarter:
    """Starts spans as the provider's SDK tracer would (see the package's docstring)."""

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
        if trace_id & LOW_64 >= path.root_bound:
            flags = FLAGS[False, path.random_ids]
            return NonRecordingSpan(
                SpanContext(trace_id, path.new_span_id(), False, flags, NO_STATE)
            )
        flags = FLAGS[True, path.random_ids]
        return self._recorded(
            path, name, kind, parent_context, None, trace_id, flags, NO_STATE, attributes, source
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
        flags = FLAGS[True, path.random_ids]
        trace_id = path.root_trace_id(True)
        return self._recorded(
            path, name, kind, parent_context, None, trace_id, flags, NO_STATE, attributes, source
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
        random_bit, bound = parent.trace_flags & RANDOM, path.child_bound
        if not ((parent.trace_flags & SAMPLED) if bound is None else trace_id & LOW_64 < bound):
            flags = FLAGS[False, random_bit]
            return NonRecordingSpan(SpanContext(trace_id, path.new_span_id(), False, flags, state))
        flags = FLAGS[True, random_bit]
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
