"""A CourseDouble server whose rate limits live in Redis, for the two-process tests.

    python -m tests.ratelimit_server REDIS_URL PREFIX [--free-per-minute N] [--burst-multiplier X]

Prints the port it listens on (127.0.0.1, ephemeral), then serves until terminated. The
chain is the production order of the links that matter here: request id, error mapping,
a test principal (from ``x-test-user`` / ``x-test-tier`` metadata), rate limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from dataclasses import replace
from typing import Any

from grpc import aio

from interceptors.errors import ErrorMapping
from interceptors.link import Behavior, ServerLink, guard
from interceptors.method import MethodInfo
from interceptors.ratelimit import RateLimit, RedisBackend
from interceptors.request_id import RequestId
from learnmesh.config import LimitSettings
from learnmesh.kernel import principal
from learnmesh.kernel.principal import Principal
from tests.doubles import CourseDouble, serve

USER_HEADER = "x-test-user"
TIER_HEADER = "x-test-tier"


class MetadataPrincipal(ServerLink):
    """Tests only: ``x-test-user`` (and ``x-test-tier``) metadata sign the caller in, so rate
    limits can be exercised per user and tier without minting tokens."""

    def wrap(self, method: MethodInfo, behavior: Behavior) -> Behavior:
        async def check(_request: Any, context: aio.ServicerContext[Any, Any]) -> None:
            found = dict(context.invocation_metadata() or ())
            user = found.get(USER_HEADER)
            principal.set_principal(
                Principal(user_id=str(user), tier=str(found.get(TIER_HEADER, "free")))
                if user
                else None
            )

        return guard(method, behavior, check)


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.ratelimit_server")
    parser.add_argument("redis_url")
    parser.add_argument("prefix")
    parser.add_argument("--free-per-minute", type=int, default=6)
    parser.add_argument("--burst-multiplier", type=float, default=100.0)
    args = parser.parse_args(argv)
    limits = replace(
        LimitSettings(),
        free_per_minute=args.free_per_minute,
        burst_multiplier=args.burst_multiplier,
    )
    link = RateLimit(limits, RedisBackend(args.redis_url, prefix=args.prefix))
    served = await serve(
        [RequestId(), ErrorMapping(), MetadataPrincipal(), link], course=CourseDouble()
    )
    print(served.port, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await served.stop()
        await link.aclose()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(sys.argv[1:]))
