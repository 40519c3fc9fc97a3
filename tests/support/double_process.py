"""B in another process: ``python -m tests.support.double_process [--traced]
[--rate-limit REDIS_URL PREFIX [--free-per-minute N] [--burst-multiplier X]] [--delay S]
[--fail-times N]``; tests start it with ``tests.support.processes.server_process``.

Serves tests.support.doubles.CourseDouble on 127.0.0.1 (plaintext, ephemeral port),
prints ``port <N>`` and runs until SIGTERM (or SIGKILL). ListCourses reports what the
double recorded, as JSON. Plain, it has no server chain; ``--traced`` puts the product's
request id, tracing, metrics and error mapping links in front, with tracing and logging
set up as a real process does (``learnmesh.telemetry``, from the ``OTEL_*`` environment),
and flushes its spans on SIGTERM: with OTEL_TRACES_EXPORTER=console the spans appear on
stdout, the JSON log on stderr. ``--rate-limit`` puts the request id, error mapping and
rate-limit links in front (with the test principal from ``x-test-user`` / ``x-test-tier``
metadata where the access link would be), counting in Redis at REDIS_URL under PREFIX, so
several such processes share one limit; both options together give the links of both.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable
from dataclasses import replace

from interceptors.errors import ErrorMapping
from interceptors.link import ServerLink
from interceptors.metrics import Metrics
from interceptors.ratelimit import RateLimit
from interceptors.request_id import RequestId
from interceptors.tracing import Tracing
from learnmesh import config
from learnmesh.kernel.logs import setup_logging
from learnmesh.telemetry import setup_tracing
from tests.support.doubles import CourseDouble
from tests.support.principal import MetadataPrincipal
from tests.support.servers import chain_links, serve


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.double_process")
    parser.add_argument("--traced", action="store_true")
    parser.add_argument("--rate-limit", nargs=2, metavar=("REDIS_URL", "PREFIX"))
    parser.add_argument("--free-per-minute", type=int, default=6)
    parser.add_argument("--burst-multiplier", type=float, default=100.0)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--fail-times", type=int, default=0)
    args = parser.parse_args(argv)
    double = CourseDouble()
    double.script.delay = args.delay
    double.script.fail_times = args.fail_times
    flush: list[Callable[[], object]] = []
    settings = config.load(env={})
    kinds: set[type[ServerLink]] = set()
    # The test principal stands where the access link would be: just before the rate limit.
    extra: ServerLink | None = None
    before: type[ServerLink] | None = None
    if args.traced:
        provider = setup_tracing("course-double")
        logs = setup_logging("INFO")
        flush += [provider.shutdown, logs.close]
        kinds |= {RequestId, Tracing, Metrics, ErrorMapping}
    if args.rate_limit:
        redis_url, prefix = args.rate_limit
        limits = replace(
            settings.limits,
            free_per_minute=args.free_per_minute,
            burst_multiplier=args.burst_multiplier,
            redis_prefix=prefix,
        )
        settings = replace(settings, redis_url=redis_url, limits=limits)
        kinds |= {RequestId, ErrorMapping, RateLimit}
        extra, before = MetadataPrincipal(), RateLimit
    links = chain_links(*kinds, settings=settings, extra=extra, before=before) if kinds else []
    served = await serve(links, course=double)
    print(f"port {served.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await served.stop()
    for done in flush:
        done()


if __name__ == "__main__":
    asyncio.run(main())
