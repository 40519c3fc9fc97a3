"""Counters in this process: sliding windows as deques of call times."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

from interceptors.ratelimit.rules import Decision, Rule


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
