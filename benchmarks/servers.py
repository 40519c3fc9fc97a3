"""The servers the benchmark drives, one per process: ``python -m benchmarks.servers CONFIG``.

Every configuration serves the same trivial CourseService methods (GetCourse, a public
read; GetProgress, a read for signed-in users), so the only difference between them is
what sits in front of the handler:

- ``bare``: a plain grpc.aio server, no interceptors: the yardstick;
- ``full``: the product's server chain, assembled by learnmesh.server exactly as
  ``learnmesh up`` does (with the real auth and user services: tokens, JWKS), tracing at 10 %
  parent-based sampling, metrics and the JSON access log on. Plaintext, since h2load
  cannot present a client certificate, so the mTLS identity link has nothing to read;
- ``full-console``: the same, with sampled spans exported by the console exporter;
- ``full-course``: the same chain in front of the real CourseService (and the real auth
  and user services, which give instructors' names through BatchGetUsers) on the
  PostgreSQL database named by ``LEARNMESH_BENCH_COURSE_DATABASE_URL``: what
  ``benchmarks.course`` measures with real data;
- ``chain``: the bare server with the product's chain holding no link: methods are served
  through the generic handlers the chain registers (``interceptors.chain.ChainedServer``)
  rather than grpc's registered-method tables, which alone changes the rate a little;
- ``tracing100`` / ``tracing10``: the chain holding the tracing link alone, sampling
  100 % / 10 % of calls.

Prints ``port N`` once serving; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import tempfile
from typing import Any

from grpc import aio

from learnmesh.course.v1 import course_pb2, course_pb2_grpc

CONFIGS = ("bare", "chain", "full", "full-console", "full-course", "tracing100", "tracing10")
SAMPLING = {
    "full": "0.1",
    "full-console": "0.1",
    "full-course": "0.1",
    "tracing10": "0.1",
    "tracing100": "1.0",
}
# full-course: where its services keep their tables (a scratch database of the benchmark's).
COURSE_DATABASE_ENV = "LEARNMESH_BENCH_COURSE_DATABASE_URL"


class BenchCourses(course_pb2_grpc.CourseServiceServicer):
    """Trivial handlers: the benchmark measures what is in front of them."""

    COURSE = course_pb2.GetCourseResponse(course=course_pb2.Course(title="Intro to gRPC"))
    PROGRESS = course_pb2.GetProgressResponse(progress=course_pb2.Progress(total_lessons=12))

    async def GetCourse(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        return self.COURSE

    async def GetProgress(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        return self.PROGRESS


def _tracing(config: str) -> None:
    os.environ["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
    os.environ["OTEL_TRACES_SAMPLER_ARG"] = SAMPLING[config]
    # Spans are made and recorded, then dropped: what an exporter costs depends on the
    # exporter, so "full-console" measures one (the console exporter, printing every
    # sampled span as indented JSON to a discarded stdout) separately.
    os.environ["OTEL_TRACES_EXPORTER"] = "console" if config == "full-console" else "none"
    from learnmesh.telemetry import setup_tracing

    setup_tracing("learnmesh-bench")


async def _bare(port: int, links: list[Any] | None) -> aio.Server:
    """A plain grpc.aio server; with ``links``, behind the chain of them."""
    from interceptors.chain import ServerChain

    server = aio.server()
    # As learnmesh.server registers services: wrapped by the chain at registration.
    target = server if links is None else ServerChain(links).applied_to(server)
    course_pb2_grpc.add_CourseServiceServicer_to_server(BenchCourses(), target)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def _full(port: int, real_courses: bool = False) -> Any:
    """The product's server and chain; with ``real_courses``, the real CourseService on
    the database of COURSE_DATABASE_ENV instead of the trivial handlers."""
    from learnmesh import config
    from learnmesh.kernel.logs import setup_logging
    from learnmesh.server import build_runtime, start_server
    from learnmesh.service import ServiceDefinition, definition

    access_log = True
    env = {}
    if real_courses:
        url = os.environ.get(COURSE_DATABASE_ENV, "")
        if not url:
            raise SystemExit(f"full-course needs {COURSE_DATABASE_ENV}")
        env["LEARNMESH_DATABASE_URL"] = url  # checked and given its driver by config.load
    base = config.load(env=env)
    limits: dict[str, Any] = {
        f.name: 10**9
        for f in dataclasses.fields(base.limits)
        if f.name.endswith(("minute", "hour"))
    }
    settings = dataclasses.replace(
        base,
        var_dir=tempfile.mkdtemp(prefix="learnmesh-bench-"),
        log_level="WARNING",
        tls=dataclasses.replace(base.tls, enabled=False),
        limits=dataclasses.replace(base.limits, **limits),
        telemetry=dataclasses.replace(base.telemetry, access_log=access_log),
    )
    setup_logging("WARNING", access_log=access_log)
    courses = ServiceDefinition(
        name="course",
        full_name="learnmesh.course.v1.CourseService",
        add_to_server=course_pb2_grpc.add_CourseServiceServicer_to_server,
        create=lambda _runtime: _async(BenchCourses()),
        migrations=None,
    )
    if real_courses:
        courses = definition("course")
    runtime, _ = build_runtime(settings, "bench")
    return await start_server(
        runtime, [definition("auth"), definition("user"), courses], host="127.0.0.1", port=port
    )


async def _async(value: Any) -> Any:
    return value


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", choices=CONFIGS)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.config in SAMPLING:
        _tracing(args.config)
    if args.config.startswith("full"):
        server = await _full(args.port, real_courses=args.config == "full-course")
        stop = server.stop
    else:
        links: list[Any] | None = None
        if args.config == "chain":
            links = []
        elif args.config.startswith("tracing"):
            from interceptors.tracing import Tracing

            links = [Tracing()]
        bare = await _bare(args.port, links)
        stop = bare.stop
    print(f"port {args.port}", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await stop(0)


if __name__ == "__main__":
    asyncio.run(main())
