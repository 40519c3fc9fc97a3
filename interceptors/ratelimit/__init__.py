"""Rate limiting: the reference document's tiers, as sliding windows per caller and class.

Who is counted, and against what (all numbers from the ``Limits`` given):
- a signed-in caller by user id, at their tier's per-minute limit times the method's class
  multiplier (read 1, write ``write_multiplier``, delete ``delete_multiplier``), plus a burst
  window of ``burst_multiplier`` x that rate spread over ``burst_window`` seconds;
- an anonymous caller of a public method by client address, at the free tier;
- login, token refresh, register and password-reset methods by client address only, each
  class against its own per-minute and per-hour limits;
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

Modules: ``rules`` (windows and the rule of each class and tier), ``callers`` (who a call
counts as), ``memory_backend`` and ``redis_backend`` (where counters live), ``backend``
(the protocol and the choice between them), ``link`` (the server link).
"""

from interceptors.ratelimit.backend import Backend, backend_for
from interceptors.ratelimit.link import LIMIT_HEADER, REMAINING_HEADER, RESET_HEADER, RateLimit
from interceptors.ratelimit.memory_backend import MemoryBackend
from interceptors.ratelimit.redis_backend import DEFAULT_REDIS_PREFIX, RedisBackend
from interceptors.ratelimit.rules import (
    DEFAULT_TIER,
    TIERS,
    Decision,
    Limits,
    Rule,
    Window,
    address_rule,
    is_limited,
    tier_rule,
)

__all__ = [
    "DEFAULT_REDIS_PREFIX",
    "DEFAULT_TIER",
    "LIMIT_HEADER",
    "REMAINING_HEADER",
    "RESET_HEADER",
    "TIERS",
    "Backend",
    "Decision",
    "Limits",
    "MemoryBackend",
    "RateLimit",
    "RedisBackend",
    "Rule",
    "Window",
    "address_rule",
    "backend_for",
    "is_limited",
    "tier_rule",
]
