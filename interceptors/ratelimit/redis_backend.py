"""Counters in Redis, shared by every process with the same prefix: one atomic Lua script
per check. When Redis is unreachable a check answers None (the link lets the call through)."""

from __future__ import annotations

import itertools
import logging
import time
import uuid

from redis import asyncio as redis_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from interceptors.ratelimit.rules import Decision, Rule, Window

log = logging.getLogger("learnmesh.ratelimit")

DEFAULT_REDIS_PREFIX = "learnmesh:rl:"

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
