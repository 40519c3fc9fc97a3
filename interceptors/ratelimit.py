"""Rate limiting: the reference document's tiers, as sliding windows per caller and class.

Who is counted, and against what (all numbers from the ``Limits`` given):
- a signed-in caller by user id, at their tier's per-minute limit times the method's class
  multiplier (read 1, write ``write_multiplier``, delete ``delete_multiplier``), plus a burst
  window of ``burst_multiplier`` x that rate spread over ``burst_window`` seconds;
- an anonymous caller of a public method by client address, at the free tier;
- login, register and password-reset methods by client address only, against their
  per-minute and per-hour limits;
- exempt and internal methods and grpc's own services not at all (their behaviour is
  returned unwrapped, so they pay nothing).

Each class has its own counters, so a login flood does not use up reads. A call passes only
when every window of its rule has room; a refused call is not counted. Every limited call
gets ``x-ratelimit-limit``, ``x-ratelimit-remaining`` and ``x-ratelimit-reset`` (unix seconds
when the tightest window frees a slot) in trailing metadata; a refused one ends with
RESOURCE_EXHAUSTED and a google.rpc.RetryInfo detail (through the error-mapping link).

Counters live in memory by default, or in Redis (one atomic Lua script per check, so several
server processes share one limit exactly) when a Redis URL is configured. If Redis is
unreachable the link fails open: the call goes through and a warning is logged (at most once
per 30 s), since refusing every call would turn a Redis outage into a mesh outage.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from grpc import aio
from redis import asyncio as redis_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from interceptors.call_state import add_trailers
from interceptors.link import Behavior, ServerLink, guard
from interceptors.method import MethodInfo
from learnmesh.common.v1 import access_pb2
from learnmesh.kernel import principal
from learnmesh.kernel.errors import ResourceExhausted

log = logging.getLogger("learnmesh.ratelimit")

LIMIT_HEADER = "x-ratelimit-limit"
REMAINING_HEADER = "x-ratelimit-remaining"
RESET_HEADER = "x-ratelimit-reset"
DEFAULT_TIER = "free"
TIERS = ("free", "basic", "pro", "enterprise")
DEFAULT_REDIS_PREFIX = "learnmesh:rl:"

# Counter names per rate class; they are part of the Redis key, so keep them stable.
_CLASS_NAMES = {
    access_pb2.RATE_CLASS_READ: "read",
    access_pb2.RATE_CLASS_WRITE: "write",
    access_pb2.RATE_CLASS_DELETE: "delete",
    access_pb2.RATE_CLASS_LOGIN: "login",
    access_pb2.RATE_CLASS_REGISTER: "register",
    access_pb2.RATE_CLASS_PASSWORD_RESET: "password_reset",
}
_ADDRESS_CLASSES = (
    access_pb2.RATE_CLASS_LOGIN,
    access_pb2.RATE_CLASS_REGISTER,
    access_pb2.RATE_CLASS_PASSWORD_RESET,
)
_PLURAL = {"read": "reads", "write": "writes", "delete": "deletes"}


@dataclass(frozen=True, slots=True)
class Window:
    """At most ``limit`` calls in any ``seconds``-long stretch."""

    seconds: int
    limit: int


@dataclass(frozen=True)
class Rule:
    """The windows one counter must fit in; ``name`` keys the counters (one per class)."""

    name: str
    windows: tuple[Window, ...]
    # Says whose calls these are, for the refusal message ("reads by a pro-tier caller").
    description: str
    # (seconds, limit) per window, for the memory backend's loop.
    spans: tuple[tuple[int, int], ...] = ()
    # Built once for the Redis backend: key suffixes and script arguments per window.
    key_suffixes: tuple[str, ...] = ()
    script_args: tuple[str, ...] = ()

    @property
    def longest(self) -> int:
        return max(w.seconds for w in self.windows)


class Decision(NamedTuple):
    """The outcome of one check, reported for the tightest window (a tuple: built per call)."""

    allowed: bool
    limit: int
    remaining: int
    window: int
    # Seconds from now until the tightest window frees a slot.
    reset_after: float


class Backend(Protocol):
    """Where counters live. ``hit`` counts one call for ``who`` if every window has room;
    it returns None when it cannot tell (the call is then let through)."""

    async def hit(self, rule: Rule, who: str) -> Decision | None: ...

    async def aclose(self) -> None: ...


class Limits(Protocol):
    """The numbers the link counts against (the runtime's ``LimitSettings`` is one)."""

    @property
    def enabled(self) -> bool: ...
    @property
    def free_per_minute(self) -> int: ...
    @property
    def basic_per_minute(self) -> int: ...
    @property
    def pro_per_minute(self) -> int: ...
    @property
    def enterprise_per_minute(self) -> int: ...
    @property
    def write_multiplier(self) -> float: ...
    @property
    def delete_multiplier(self) -> float: ...
    @property
    def burst_multiplier(self) -> float: ...
    @property
    def burst_window(self) -> int: ...
    @property
    def login_per_minute(self) -> int: ...
    @property
    def login_per_hour(self) -> int: ...
    @property
    def register_per_minute(self) -> int: ...
    @property
    def register_per_hour(self) -> int: ...
    @property
    def password_reset_per_minute(self) -> int: ...
    @property
    def password_reset_per_hour(self) -> int: ...


def _rule(name: str, description: str, windows: list[Window]) -> Rule:
    """A rule with one window per length (the tightest limit wins when two coincide)."""
    by_length: dict[int, int] = {}
    for window in windows:
        by_length[window.seconds] = min(window.limit, by_length.get(window.seconds, window.limit))
    kept = tuple(Window(seconds, limit) for seconds, limit in sorted(by_length.items()))
    return Rule(
        name,
        kept,
        description,
        spans=tuple((w.seconds, w.limit) for w in kept),
        key_suffixes=tuple(f":{w.seconds}" for w in kept),
        script_args=tuple(str(v) for w in kept for v in (w.seconds * 1000, w.limit)),
    )


def _whole(value: float) -> int:
    """At least one call: a limit of zero would lock a class out entirely."""
    return max(1, math.floor(value + 1e-9))


def tier_rule(limits: Limits, rate_class: access_pb2.RateClass.ValueType, tier: str) -> Rule:
    """Per-minute tier limit times the class multiplier, plus the burst window."""
    multiplier = {
        access_pb2.RATE_CLASS_READ: 1.0,
        access_pb2.RATE_CLASS_WRITE: limits.write_multiplier,
        access_pb2.RATE_CLASS_DELETE: limits.delete_multiplier,
    }[rate_class]
    per_minute = float(getattr(limits, f"{tier}_per_minute")) * multiplier
    burst = limits.burst_multiplier * per_minute * limits.burst_window / 60
    name = _CLASS_NAMES[rate_class]
    return _rule(
        name,
        f"{_PLURAL[name]} by a {tier}-tier caller",
        [Window(60, _whole(per_minute)), Window(limits.burst_window, _whole(burst))],
    )


def address_rule(limits: Limits, rate_class: access_pb2.RateClass.ValueType) -> Rule:
    """The per-address minute and hour limits of login, register and password reset."""
    name = _CLASS_NAMES[rate_class]
    return _rule(
        name,
        f"{name.replace('_', ' ')} calls from this address",
        [
            Window(60, getattr(limits, f"{name}_per_minute")),
            Window(3600, getattr(limits, f"{name}_per_hour")),
        ],
    )


def is_limited(method: MethodInfo) -> bool:
    """Exempt and internal methods and grpc's own services are never counted."""
    return not (
        method.service.startswith("grpc.")
        or method.policy.access == access_pb2.ACCESS_INTERNAL
        or method.rate_class == access_pb2.RATE_CLASS_EXEMPT
    )


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
        self._tier_rules = {
            rate_class: {tier: tier_rule(limits, rate_class, tier) for tier in TIERS}
            for rate_class in (
                access_pb2.RATE_CLASS_READ,
                access_pb2.RATE_CLASS_WRITE,
                access_pb2.RATE_CLASS_DELETE,
            )
        }
        self._address_rules = {c: address_rule(limits, c) for c in _ADDRESS_CLASSES}

    async def aclose(self) -> None:
        await self.backend.aclose()

    def wrap(self, method: MethodInfo, behavior: Behavior) -> Behavior:
        if not self.limits.enabled or not is_limited(method):
            return behavior
        rate_class = method.rate_class
        decide = self._decide
        if rate_class in self._address_rules:
            rule = self._address_rules[rate_class]

            def by_address(_context: aio.ServicerContext[Any, Any]) -> tuple[Rule, str, str]:
                return rule, "addr:" + principal.call_info().client_address, ""

            counted = by_address
        else:
            rules: Mapping[str, Rule] = self._tier_rules.get(
                rate_class, self._tier_rules[access_pb2.RATE_CLASS_WRITE]
            )
            anonymous = rules[DEFAULT_TIER]

            def by_caller(_context: aio.ServicerContext[Any, Any]) -> tuple[Rule, str, str]:
                caller = principal.current_or_none()
                if caller is None:
                    who = "addr:" + principal.call_info().client_address
                    return anonymous, who, " (not signed in: counted by address)"
                return rules.get(caller.tier, anonymous), "user:" + caller.user_id, ""

            counted = by_caller

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


class _Bucket:
    """One caller's counters for one class: a deque of call times per window."""

    __slots__ = ("calls", "seen")

    def __init__(self, windows: int, now: float) -> None:
        self.calls: list[deque[float]] = [deque() for _ in range(windows)]
        self.seen = now


class MemoryBackend:
    """Counters in this process: per-window deques of call times, O(1) amortised per call.

    Buckets are kept per class in least-recently-seen order; a new bucket first drops the
    buckets nobody has called for a whole window (they are empty by then), and if more than
    ``max_keys`` remain, the least recently seen are dropped too, so memory stays bounded
    even under a flood of distinct addresses (the cost: such a caller starts afresh).
    """

    def __init__(
        self, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_keys = max_keys
        self._clock = clock
        self._tables: dict[str, OrderedDict[str, _Bucket]] = {}

    def __len__(self) -> int:
        return sum(len(table) for table in self._tables.values())

    async def hit(self, rule: Rule, who: str) -> Decision:
        return self.hit_now(rule, who)

    def hit_now(self, rule: Rule, who: str) -> Decision:
        now = self._clock()
        table = self._tables.get(rule.name)
        if table is None:
            table = self._tables[rule.name] = OrderedDict()
        bucket = table.get(who)
        if bucket is None:
            self._evict(table, now - rule.longest)
            bucket = table[who] = _Bucket(len(rule.windows), now)
        else:
            table.move_to_end(who)
            bucket.seen = now
        allowed = True
        for calls, (seconds, limit) in zip(bucket.calls, rule.spans, strict=False):
            horizon = now - seconds
            while calls and calls[0] <= horizon:
                calls.popleft()
            if len(calls) >= limit:
                allowed = False
        # The tightest window: fewest calls left; on a tie, the one that frees a slot last.
        best: tuple[int, int, int, float] | None = None  # limit, remaining, seconds, reset_after
        for calls, (seconds, limit) in zip(bucket.calls, rule.spans, strict=False):
            if allowed:
                calls.append(now)
            remaining = limit - len(calls)
            reset_after = calls[0] + seconds - now if calls else 0.0
            if (
                best is None
                or remaining < best[1]
                or (remaining == best[1] and reset_after > best[3])
            ):
                best = (limit, remaining, seconds, reset_after)
        assert best is not None  # a rule has at least one window
        limit, remaining, seconds, reset_after = best
        # tuple.__new__: a NamedTuple's own constructor is a Python function, and this runs
        # on every call.
        return tuple.__new__(
            Decision, (allowed, limit, remaining if remaining > 0 else 0, seconds, reset_after)
        )

    def _evict(self, table: OrderedDict[str, _Bucket], idle_before: float) -> None:
        while table:
            oldest = next(iter(table.values()))
            if oldest.seen > idle_before and len(table) < self.max_keys:
                return
            table.popitem(last=False)

    async def aclose(self) -> None:
        self._tables.clear()


# KEYS: one sorted set per window. ARGV[1]: a member unique to this call; then per window
# its length in milliseconds and its limit. Uses the Redis server's clock, so processes with
# skewed clocks still agree. Returns {allowed, then per window: count, oldest score, now}.
_SLIDING_WINDOWS = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local counts = {}
local allowed = 1
for i = 1, #KEYS do
  local window = tonumber(ARGV[2 * i])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  counts[i] = redis.call('ZCARD', KEYS[i])
  if counts[i] >= tonumber(ARGV[2 * i + 1]) then allowed = 0 end
end
local result = {allowed, now}
for i = 1, #KEYS do
  if allowed == 1 then
    redis.call('ZADD', KEYS[i], now, ARGV[1])
    redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[2 * i]))
    counts[i] = counts[i] + 1
  end
  local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  result[#result + 1] = counts[i]
  result[#result + 1] = tonumber(oldest[2] or now)
end
return result
"""


class RedisBackend:
    """Counters in Redis, shared by every process using the same ``prefix``.

    Keys are ``<prefix><class>:<who>:<window seconds>`` sorted sets of call times (ms),
    expiring after their window. On a Redis error the call is let through, further calls
    skip Redis for ``retry_interval`` seconds, and a warning is logged at most every
    ``warn_interval`` seconds.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_REDIS_PREFIX,
        timeout: float = 0.5,
        retry_interval: float = 1.0,
        warn_interval: float = 30.0,
    ) -> None:
        self.prefix = prefix
        self.client = redis_asyncio.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # Retrying with backoff would hold up the call; failing open is the fallback.
            retry=Retry(NoBackoff(), 0),
        )
        self._script = self.client.register_script(_SLIDING_WINDOWS)
        self._retry_interval = retry_interval
        self._warn_interval = warn_interval
        self._skip_until = float("-inf")
        self._warned_at = float("-inf")
        self._failing = False
        self._member_prefix = uuid.uuid4().hex[:12] + ":"
        self._sequence = itertools.count()

    async def hit(self, rule: Rule, who: str) -> Decision | None:
        now = time.monotonic()
        if now < self._skip_until:
            return None
        head = f"{self.prefix}{rule.name}:{who}"
        member = self._member_prefix + str(next(self._sequence))
        try:
            reply = await self._script(
                keys=[head + suffix for suffix in rule.key_suffixes],
                args=[member, *rule.script_args],
            )
        except (RedisError, OSError) as exc:
            self._skip_until = now + self._retry_interval
            self._failing = True
            if now - self._warned_at >= self._warn_interval:
                self._warned_at = now
                log.warning("rate limits are off (failing open): Redis is unreachable: %s", exc)
            return None
        if self._failing:
            self._failing = False
            log.info("rate limits are back on: Redis answers again")
        allowed, server_now = int(reply[0]), int(reply[1])
        tightest: tuple[int, int, Window] | None = None
        for index, window in enumerate(rule.windows):
            count, oldest = int(reply[2 + 2 * index]), int(reply[3 + 2 * index])
            remaining = window.limit - count
            reset_ms = oldest + window.seconds * 1000 - server_now if count else 0
            if tightest is None or (remaining, -reset_ms) < (tightest[0], -tightest[1]):
                tightest = (remaining, reset_ms, window)
        assert tightest is not None
        remaining, reset_ms, window = tightest
        return Decision(
            bool(allowed), window.limit, max(remaining, 0), window.seconds, reset_ms / 1000
        )

    async def aclose(self) -> None:
        await self.client.aclose()


def backend_for(redis_url: str | None, prefix: str = DEFAULT_REDIS_PREFIX) -> Backend:
    """Redis when ``redis_url`` is given (limits shared across processes), else memory."""
    if redis_url:
        return RedisBackend(redis_url, prefix=prefix)
    return MemoryBackend()
