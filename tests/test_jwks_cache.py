"""The key cache's fetch discipline (unit level: the cache alone, its fetch a test double)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from learnmesh.kernel.errors import Unavailable
from learnmesh.kernel.tokens import JwksCache


async def test_failed_fetches_are_not_retried_faster_than_min_refetch() -> None:
    calls = 0

    async def unreachable() -> list[dict[str, Any]]:
        nonlocal calls
        calls += 1
        raise OSError("connection refused")

    cache = JwksCache(unreachable, min_refetch=60)
    for _ in range(20):  # a flood of tokens while the auth service is down
        with pytest.raises(Unavailable):
            await cache.key("some-kid")
    assert calls == 1
    await cache.aclose()


async def test_a_caller_that_runs_out_of_time_leaves_the_fetch_running() -> None:
    release = asyncio.Event()

    async def slow() -> list[dict[str, Any]]:
        await release.wait()
        return []

    cache = JwksCache(slow)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(cache.key("kid"), timeout=0.05)
    fetching = cache._fetching
    assert fetching is not None and not fetching.done()  # shielded: not cancelled with it
    release.set()
    await fetching
    await cache.aclose()
