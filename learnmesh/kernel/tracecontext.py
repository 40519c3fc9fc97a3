"""The current OpenTelemetry context, read and set without the API's extra frames.

Kept in the kernel because both the tracing links and the log lines (which carry the
current trace and span ids) need it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

# The key the API keeps the current span under in a Context, found through the public API.
(SPAN_KEY,) = trace.set_span_in_context(trace.INVALID_SPAN, Context())


def _runtime_context_var() -> ContextVar[Context] | None:
    """The context variable behind OpenTelemetry's default runtime context (a private
    field, read once); None when another runtime context is configured."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    if type(runtime) is not ContextVarsRuntimeContext:
        return None
    found = getattr(runtime, "_current_context", None)
    return found if isinstance(found, ContextVar) else None


_CURRENT = _runtime_context_var()
# otel_context.attach and get_current without their two Python frames each (the tracing
# link attaches, and the access log looks, on every call); the API's own functions when
# the default runtime context is not the one in use.
attach: Callable[[Context], object] = _CURRENT.set if _CURRENT is not None else otel_context.attach
current_context: Callable[[], Context] = (
    _CURRENT.get if _CURRENT is not None else otel_context.get_current
)


def context_of(span: trace.Span) -> Context:
    """A context holding ``span`` alone: ``set_span_in_context(span, Context())`` without
    copying an empty context first."""
    return Context({SPAN_KEY: span})
