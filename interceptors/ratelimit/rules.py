"""What the rate limits are: windows, the rule of each rate class and tier, and which
methods are limited at all (interceptors.ratelimit's docstring says who counts against what).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from interceptors.method import MethodInfo
from learnmesh.common.v1 import access_pb2

DEFAULT_TIER = "free"
TIERS = ("free", "basic", "pro", "enterprise")

# Counter names per rate class; they are part of the Redis key, so keep them stable.
_CLASS_NAMES = {
    access_pb2.RATE_CLASS_READ: "read",
    access_pb2.RATE_CLASS_WRITE: "write",
    access_pb2.RATE_CLASS_DELETE: "delete",
    access_pb2.RATE_CLASS_LOGIN: "login",
    access_pb2.RATE_CLASS_REFRESH: "refresh",
    access_pb2.RATE_CLASS_REGISTER: "register",
    access_pb2.RATE_CLASS_PASSWORD_RESET: "password_reset",
}
ADDRESS_CLASSES = (
    access_pb2.RATE_CLASS_LOGIN,
    access_pb2.RATE_CLASS_REFRESH,
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
    def refresh_per_minute(self) -> int: ...
    @property
    def refresh_per_hour(self) -> int: ...
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
    """The per-address minute and hour limits of login, refresh, register and password
    reset."""
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


TIER_CLASSES = (
    access_pb2.RATE_CLASS_READ,
    access_pb2.RATE_CLASS_WRITE,
    access_pb2.RATE_CLASS_DELETE,
)


class RuleBook:
    """Every rule of one set of limits, built once: per tier for the tiered classes, per
    class for the address-only ones."""

    def __init__(self, limits: Limits) -> None:
        self.tiered = {
            rate_class: {tier: tier_rule(limits, rate_class, tier) for tier in TIERS}
            for rate_class in TIER_CLASSES
        }
        self.by_address = {c: address_rule(limits, c) for c in ADDRESS_CLASSES}

    def address_rule(self, rate_class: access_pb2.RateClass.ValueType) -> Rule | None:
        """The rule of a class counted by address only (login, refresh, register, password
        reset)."""
        return self.by_address.get(rate_class)

    def tier_rules(self, rate_class: access_pb2.RateClass.ValueType) -> dict[str, Rule]:
        """The rules of a tiered class by tier (any other class counts as a write)."""
        return self.tiered.get(rate_class, self.tiered[access_pb2.RATE_CLASS_WRITE])
