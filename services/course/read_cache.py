"""Recent GetCourse answers, kept for a second: a popular course is read from the database
about once a second per process, not once per call.

A write made by this process drops its course's answer at once (the rules call
``forget``), so a caller reads its own writes; a write on another replica shows here after
at most ``ttl`` seconds. Archived courses (whose answer depends on the caller) and answers
with stale instructor names are never kept, and a kept answer is not used while the user
service is unreachable (its names could no longer be called fresh). ``ttl`` 0 turns the cache off.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")
LIMIT = 10_000  # answers kept at most; beyond, the older half goes


class ReadCache(Generic[V]):
    def __init__(self, ttl: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._answers: dict[str, tuple[V, float]] = {}
        # Counts the writes that dropped answers: a read that began before one of them
        # may have seen the old row, so its answer is not kept (``mark`` / ``put``).
        self._writes = 0

    def mark(self) -> int:
        """Taken before a read from the database; handed back to ``put``."""
        return self._writes

    def get(self, key: str) -> V | None:
        found = self._answers.get(key)
        if found is None:
            return None
        if self.clock() >= found[1]:
            self._answers.pop(key, None)
            return None
        return found[0]

    def put(self, key: str, value: V, mark: int) -> None:
        if self.ttl <= 0 or mark != self._writes:
            return
        if len(self._answers) >= LIMIT:
            for old in list(self._answers)[: LIMIT // 2]:
                del self._answers[old]
        self._answers[key] = (value, self.clock() + self.ttl)

    def forget(self, key: str) -> None:
        self._writes += 1
        self._answers.pop(key, None)

    def clear(self) -> None:
        self._writes += 1
        self._answers.clear()
