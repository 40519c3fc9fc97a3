"""Spans for the tracing links, made as the OpenTelemetry SDK would make them, at a fraction
of the cost.

The SDK's ``Tracer.start_span`` costs the call measurable time even for a span its sampler
drops, and a recorded ``Span`` more (a sampler call, a lock, bounded containers that
re-check every attribute value, a copy at the end); the links make a span per call
(benchmarks/links.py measures each link's cost, benchmarks.run the chain's, with results in
benchmarks/RESULTS.md). So ``SpanStarter`` takes the SDK's decisions itself when it can
follow them exactly (``fast_path``):

- a dropped span is a ``NonRecordingSpan`` made directly (a root's ids are drawn only if
  something asks for them: ``DroppedRoot``); its trace id, flags and trace state still
  propagate;
- a sampled span is a ``RecordedSpan``: plain fields while it runs, handed to the
  provider's span processors as the SDK's own ``ReadableSpan`` when it ends. What a handler
  adds to it goes through the SDK's bounded containers under the provider's span limits, so
  processors and exporters receive what the SDK would have given them.

Any other sampler or set-up: the SDK makes every span.

Modules: ``fast_path`` (when the SDK's decisions can be followed, and how), ``dropped`` and
``recorded`` (the two kinds of span made here), ``starter`` (SpanStarter).
"""

from interceptors.spans.dropped import DroppedRoot
from interceptors.spans.fast_path import FastPath, fast_path
from interceptors.spans.recorded import RecordedSpan
from interceptors.spans.starter import SpanStarter

__all__ = ["DroppedRoot", "FastPath", "RecordedSpan", "SpanStarter", "fast_path"]
