"""What each server link costs in-process, in microseconds per call: a diagnostic for
work on the chain's hot path (the figures that count come from ``benchmarks.run``).

    python -m benchmarks.links [--calls 20000]

Each call runs in a task of its own, as grpc.aio runs handlers, against a stand-in
context; the figure for a link is the time per call with that link alone minus the time
with no link, then the whole chain's. The links are the product's, built by
learnmesh.server.server_links. Tracing samples 10 % (parent-based) and records without
exporting.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

os.environ.update(
    OTEL_TRACES_SAMPLER="parentbased_traceidratio",
    OTEL_TRACES_SAMPLER_ARG="0.1",
    OTEL_TRACES_EXPORTER="none",
)

from interceptors.auth import AccessPolicy
from interceptors.deadline import Deadline
from interceptors.errors import ErrorMapping
from interceptors.identity import PeerIdentity
from interceptors.link import ServerLink
from interceptors.method import method_info
from interceptors.metrics import Metrics
from interceptors.ratelimit import RateLimit
from interceptors.request_id import RequestId
from interceptors.tracing import Tracing
from interceptors.validation import Validation
from learnmesh import config
from learnmesh.course.v1 import course_pb2
from learnmesh.kernel.logs import setup_logging
from learnmesh.server import server_links
from learnmesh.telemetry import setup_tracing

METHOD = "/learnmesh.course.v1.CourseService/GetCourse"
REQUEST = course_pb2.GetCourseRequest(course_id="6f1c1f4e-8d1a-4c56-9a43-0e6f2b7d9a10")
RESPONSE = course_pb2.GetCourseResponse()


class StandInContext:
    """What the links ask of a grpc.aio ServicerContext on a public unary call."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("user-agent", "h2load"),)

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    def time_remaining(self) -> None:
        return None

    def set_trailing_metadata(self, _metadata: Any) -> None:
        pass

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def code(self) -> None:  # no status set by the handler
        return None


async def handler(_request: Any, _context: Any) -> Any:
    return RESPONSE


async def _no_keys() -> list[dict[str, str]]:
    return []


def chain(*only: type[ServerLink], access_log: bool = True) -> list[ServerLink]:
    """The product's server chain (``only`` those links when named), as a plaintext server
    builds it, with limits no call reaches and no signing keys (public calls only)."""
    base = config.load(env={})
    settings = dataclasses.replace(
        base,
        limits=dataclasses.replace(base.limits, free_per_minute=10**9),
        telemetry=dataclasses.replace(base.telemetry, access_log=access_log),
    )
    return server_links(None, {}, tls=False, settings=settings, jwks=_no_keys, only=only or None)


# Each link measured alone, built as the whole chain builds it.
ALONE: dict[str, Callable[[], list[ServerLink]]] = {
    "RequestId": lambda: chain(RequestId),
    "Tracing (10 %)": lambda: chain(Tracing),
    "Metrics": lambda: chain(Metrics, access_log=False),
    "Metrics + access log": lambda: chain(Metrics),
    "ErrorMapping": lambda: chain(ErrorMapping),
    "Deadline": lambda: chain(Deadline),
    "PeerIdentity": lambda: chain(PeerIdentity),
    "AccessPolicy (public)": lambda: chain(AccessPolicy),
    "RateLimit": lambda: chain(RateLimit),
    "Validation": lambda: chain(Validation),
}


async def per_call(chain: list[ServerLink], calls: int) -> float:
    behavior: Any = handler
    method = method_info(METHOD, "unary_unary")
    for link in reversed(chain):
        behavior = link.wrap(method, behavior)
    context = StandInContext()

    async def one() -> Any:
        return await behavior(REQUEST, context)

    for _ in range(calls // 10):  # warm up
        await asyncio.ensure_future(one())
    started = time.perf_counter()
    for _ in range(calls):
        await asyncio.ensure_future(one())
    return (time.perf_counter() - started) / calls * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    calls = parser.parse_args().calls
    setup_tracing("learnmesh-links")
    with open(os.devnull, "w") as sink:  # noqa: ASYNC230 - /dev/null, before any load
        setup_logging("WARNING", access_log=True, stream=sink)
        base = await per_call([], calls)
        print(f"{'task + trivial handler':<24} {base:6.1f} µs")
        for name, make in ALONE.items():
            print(f"{name:<24} +{await per_call(make(), calls) - base:5.1f} µs")
        whole = await per_call(chain(), calls)
        print(f"{'whole chain':<24} +{whole - base:5.1f} µs")


if __name__ == "__main__":
    asyncio.run(main())
