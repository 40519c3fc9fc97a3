"""Where counters live: the backend protocol, and the backend a configuration asks for."""

from __future__ import annotations

from typing import Protocol

from interceptors.ratelimit.memory_backend import MemoryBackend
from interceptors.ratelimit.redis_backend import DEFAULT_REDIS_PREFIX, RedisBackend
from interceptors.ratelimit.rules import Decision, Rule


class Backend(Protocol):
    """Where counters live. ``hit`` counts one call for ``who`` if every window has room;
    it returns None when it cannot tell (the call is then let through)."""

    async def hit(self, rule: Rule, who: str) -> Decision | None: ...

    async def aclose(self) -> None: ...


def backend_for(redis_url: str | None, prefix: str = DEFAULT_REDIS_PREFIX) -> Backend:
    """Redis when ``redis_url`` is given (limits shared across processes), else memory."""
    if redis_url:
        return RedisBackend(redis_url, prefix=prefix)
    return MemoryBackend()
