"""Process-wide tracing set-up: the OpenTelemetry tracer provider.

``setup_tracing`` follows the standard ``OTEL_*`` variables, with one deliberate difference:
an unset ``OTEL_TRACES_EXPORTER`` means no exporter (the specification's default is otlp),
so a fresh ``learnmesh up`` does not spam connection errors at a collector nobody runs.
Spans are still made and sampled (trace ids appear in logs and travel to other services).
Logging is set up by ``learnmesh.kernel.logs.setup_logging``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from learnmesh.config import ConfigError

EXPORTERS = ("otlp", "console", "none")
# How soon the console exporter prints a finished span (ms), unless OTEL_BSP_SCHEDULE_DELAY
# says otherwise: quick enough for a person watching `learnmesh up`.
CONSOLE_DELAY_MS = 200


def _exporter_names(env: Mapping[str, str]) -> list[str]:
    raw = env.get("OTEL_TRACES_EXPORTER", "")
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    for name in names:
        if name not in EXPORTERS:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER: {name!r} is not supported; use {', '.join(EXPORTERS)}"
            )
    return [name for name in names if name != "none"]


def _otlp_processor(env: Mapping[str, str]) -> BatchSpanProcessor:
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    ) or "grpc"
    if protocol.strip().lower() != "grpc":
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported; learnmesh exports "
            "OTLP over gRPC (grpc)"
        )
    # Imported here: the exporter pulls in a lot that a process without OTLP never needs.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    # It reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, _CERTIFICATE, … itself.
    return BatchSpanProcessor(OTLPSpanExporter())


def _console_processor(env: Mapping[str, str]) -> BatchSpanProcessor:
    delay = None if env.get("OTEL_BSP_SCHEDULE_DELAY") else CONSOLE_DELAY_MS
    # Batched: the exporter's thread prints, never the event loop.
    # sys.stdout as it is now (the exporter's default is bound when the SDK is imported).
    return BatchSpanProcessor(ConsoleSpanExporter(out=sys.stdout), schedule_delay_millis=delay)


def setup_tracing(service_name: str, *, set_global: bool = True) -> TracerProvider:
    """The SDK tracer provider the ``OTEL_*`` variables describe.

    Sampler: OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (read by the SDK; default
    parentbased_always_on). Exporter: OTEL_TRACES_EXPORTER = otlp (OTLP/gRPC, batched),
    console (batched, printed within CONSOLE_DELAY_MS), none or unset (no exporter).
    Resource: service.name = ``service_name`` unless OTEL_SERVICE_NAME or
    OTEL_RESOURCE_ATTRIBUTES name one. Call ``shutdown()`` on the result at exit to flush
    (the SDK also does at interpreter exit). Raises ConfigError for unsupported values.
    """
    env = os.environ
    names = _exporter_names(env)
    from_env = OTELResourceDetector().detect().attributes
    resource = Resource.create({SERVICE_NAME: service_name, **from_env})
    provider = TracerProvider(resource=resource)
    for name in names:
        if name == "otlp":
            provider.add_span_processor(_otlp_processor(env))
        elif name == "console":
            provider.add_span_processor(_console_processor(env))
    if set_global:
        trace.set_tracer_provider(provider)
    return provider
