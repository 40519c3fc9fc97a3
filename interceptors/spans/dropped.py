"""A root span the sampler dropped, whose ids are drawn only when something asks."""

from __future__ import annotations

from opentelemetry.trace import NonRecordingSpan, SpanContext

from interceptors.spans.fast_path import FLAGS, NO_STATE, FastPath


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
                FLAGS[False, path.random_ids],
                NO_STATE,
            )
        return found
