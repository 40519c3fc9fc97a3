"""Revoked access tokens: what a signature cannot tell, held in every process.

Access tokens are verified locally, so a server learns of a logout, a revoked session, a
role change or a deletion only from the revocation feed (``learnmesh.revocation``), which
fills this list. Two kinds of entry:

* a revoked **session**: every token naming it (``sid``) is refused;
* a user's **not-before** time: that user's tokens issued before it (``iat``) are refused
  (a role change, a deletion, "sign out everywhere").

Each entry is kept only until the tokens it concerns would have expired anyway (plus the
verifier's clock leeway), then pruned, so memory is bounded by the revocations of one
token lifetime. ``refuses`` is on every authenticated call: one or two dict lookups, no
lock, no await and, while the list is empty, no allocation. Writers take a lock, so the
feed may run in another thread than the callers; a reader sees a dict before or after a
write, never a torn one (single dict operations are atomic).
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Iterable

from learnmesh.kernel.principal import Principal
from learnmesh.kernel.tokens import LEEWAY

SESSION = "session"
USER = "user"


class RevocationList:
    """Revoked sessions and per-user not-before times, each until it no longer matters."""

    def __init__(self, *, clock: Callable[[], float] = time.time, grace: float = LEEWAY):
        self._clock = clock
        # A token past its ``exp`` still verifies for LEEWAY seconds: keep entries as long.
        self._grace = grace
        self._sessions: dict[str, float] = {}  # session id -> kept until (epoch seconds)
        self._not_before: dict[str, tuple[float, float]] = {}  # user -> (not before, until)
        # (until, kind, key): the next entry to forget first; stale items are skipped.
        self._expiries: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()

    def revoke_sessions(self, session_ids: Iterable[str], until: float) -> None:
        """Refuses tokens of these sessions until ``until`` (when their last one expires)."""
        with self._lock:
            self._prune_locked(self._clock())
            if until + self._grace <= self._clock():
                return  # every token of them has expired already
            for session_id in session_ids:
                if session_id and until > self._sessions.get(session_id, float("-inf")):
                    self._sessions[session_id] = until
                    heapq.heappush(self._expiries, (until, SESSION, session_id))

    def revoke_user_before(self, user_id: str, not_before: float, until: float) -> None:
        """Refuses ``user_id``'s tokens issued before ``not_before``, until ``until`` (when
        the last of them expires). A later not-before wins over an earlier one."""
        if not user_id:
            return
        with self._lock:
            now = self._clock()
            self._prune_locked(now)
            if until + self._grace <= now:
                return
            held = self._not_before.get(user_id)
            if held is not None:
                not_before, until = max(not_before, held[0]), max(until, held[1])
                if (not_before, until) == held:
                    return
            self._not_before[user_id] = (not_before, until)
            heapq.heappush(self._expiries, (until, USER, user_id))

    def refuses(self, caller: Principal) -> bool:
        """Whether ``caller``'s token was revoked (the auth link asks on every call)."""
        sessions = self._sessions
        if sessions and caller.session_id in sessions:
            return True
        not_before = self._not_before
        if not_before:
            held = not_before.get(caller.user_id)
            if held is not None and caller.issued_at < held[0]:
                return True
        return False

    def session_revoked(self, session_id: str) -> bool:
        return session_id in self._sessions

    def issued_too_early(self, user_id: str, issued_at: float) -> bool:
        held = self._not_before.get(user_id)
        return held is not None and issued_at < held[0]

    def prune(self) -> int:
        """Forgets the entries whose tokens have all expired; how many went."""
        with self._lock:
            return self._prune_locked(self._clock())

    def _prune_locked(self, now: float) -> int:
        gone = 0
        horizon = now - self._grace
        expiries = self._expiries
        while expiries and expiries[0][0] <= horizon:
            _, kind, key = heapq.heappop(expiries)
            if kind == SESSION:
                until = self._sessions.get(key)
                if until is not None and until <= horizon:
                    del self._sessions[key]
                    gone += 1
            else:
                held = self._not_before.get(key)
                if held is not None and held[1] <= horizon:
                    del self._not_before[key]
                    gone += 1
        return gone

    def __len__(self) -> int:
        return len(self._sessions) + len(self._not_before)
