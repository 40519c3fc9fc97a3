"""The rate-limit link: counts each limited call against its caller's rule, reports the
tightest window in trailing metadata and refuses the call when a window is full."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from grpc import aio

from interceptors.call_state import add_trailers
from interceptors.link import Behavior, ServerLink, guard
from interceptors.method import MethodInfo
from interceptors.ratelimit.backend import Backend
from interceptors.ratelimit.callers import counted_as
from interceptors.ratelimit.rules import Decision, Limits, Rule, RuleBook, is_limited
from learnmesh.kernel.errors import ResourceExhausted

LIMIT_HEADER = "x-ratelimit-limit"
REMAINING_HEADER = "x-ratelimit-remaining"
RESET_HEADER = "x-ratelimit-reset"


class RateLimit(ServerLink):
    """Counts each limited call against its caller's rule; refuses when a window is full."""

    def __init__(
        self,
        limits: Limits,
        backend: Backend,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits
        self.backend = backend
        self._wall_clock = wall_clock
        self.rules = RuleBook(limits)

    async def aclose(self) -> None:
        await self.backend.aclose()

    def wrap(self, method: MethodInfo, behavior: Behavior) -> Behavior:
        if not self.limits.enabled or not is_limited(method):
            return behavior
        decide = self._decide
        counted = counted_as(method, self.rules)

        # An in-memory backend answers at once: no coroutine to make and await per call.
        hit_now: Callable[[Rule, str], Decision] | None = getattr(self.backend, "hit_now", None)
        if hit_now is not None:

            def check_now(_request: Any, context: aio.ServicerContext[Any, Any]) -> None:
                rule, who, whose = counted(context)
                decide(context, rule, hit_now(rule, who), whose)

            return guard(method, behavior, check_now)
        hit = self.backend.hit

        async def check(_request: Any, context: aio.ServicerContext[Any, Any]) -> None:
            rule, who, whose = counted(context)
            decide(context, rule, await hit(rule, who), whose)

        return guard(method, behavior, check)

    def _decide(
        self,
        context: aio.ServicerContext[Any, Any],
        rule: Rule,
        decision: Decision | None,
        whose: str,
    ) -> None:
        """Reports the tightest window in trailing metadata; raises if the call is refused."""
        if decision is None:  # the backend could not tell: fail open, report nothing
            return
        allowed, limit, remaining, window, reset_after = decision
        add_trailers(
            context,
            (LIMIT_HEADER, str(limit)),
            (REMAINING_HEADER, str(remaining)),
            (RESET_HEADER, str(math.ceil(self._wall_clock() + reset_after))),
        )
        if not allowed:
            retry_after = min(max(reset_after, 0.001), float(window))
            raise ResourceExhausted(
                f"rate limit exceeded: {limit} call{'' if limit == 1 else 's'} per {window} s"
                f" for {rule.description}{whose}; retry in {math.ceil(retry_after)} s",
                retry_after=retry_after,
            )
