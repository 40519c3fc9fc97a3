"""The sign-in throttle: at most ``throttle_per_email`` wrong guesses per email (and
``throttle_per_address`` per client address) within ``throttle_window``.

A guess (a password, a TOTP or recovery code) is *reserved* before it is verified: the
count of recent failures and the insert of the new attempt happen in one serialised
transaction (``Deps.serialised``), and the attempt counts as a failure from that moment.
So however many calls race, at most the limit's number of guesses is ever verified; the
others are refused before any verification. After verification the reservation becomes a
success, stays a failure, or is given back when it was no wrong guess (the password was
right but the code is still to come, the profile is gone, the user service is down).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from learnmesh.db import utcnow
from learnmesh.kernel.errors import ResourceExhausted
from services.auth import store
from services.auth.deps import Deps


def retry_after(failures: Sequence[datetime], limit: int, window: int, now: datetime) -> float:
    """Seconds until fewer than ``limit`` of ``failures`` (oldest first) are in the window."""
    if len(failures) < limit:
        return 0.0
    leaves_at = failures[len(failures) - limit] + timedelta(seconds=window)
    return max((leaves_at - now).total_seconds(), 1.0)


@dataclass
class Guess:
    """A reserved attempt: a failure unless it is turned into a success or given back."""

    attempt_id: str
    email: str
    # Set once the attempt's outcome is decided (success, failure, or given back).
    settled: bool = False


class Throttle:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def window_start(self) -> datetime:
        return utcnow() - timedelta(seconds=self.deps.settings.throttle_window)

    async def reserve(
        self, email: str, address: str, *, event: str = "login.failed", subject: str = ""
    ) -> Guess:
        """Counts one guess for ``email`` and ``address``, or refuses it with
        RESOURCE_EXHAUSTED (with RetryInfo) when the limit is reached; the refusal is
        audited as ``event`` and happens before anything is verified, so a locked account
        cannot be probed."""
        settings = self.deps.settings
        names = [f"auth.throttle.email:{email}"]
        if address:
            names.append(f"auth.throttle.address:{address}")
        async with self.deps.serialised(*names) as session:
            now = utcnow()
            since = now - timedelta(seconds=settings.throttle_window)
            by_email = await store.email_failures_since(session, email, since)
            by_address = (
                await store.address_failures_since(session, address, since) if address else []
            )
            wait = max(
                retry_after(by_email, settings.throttle_per_email, settings.throttle_window, now),
                retry_after(
                    by_address, settings.throttle_per_address, settings.throttle_window, now
                ),
            )
            if wait <= 0:
                attempt_id = await store.add_attempt(
                    session, email, address, succeeded=False, prune_before=since
                )
                return Guess(attempt_id, email)
        await self.deps.audit_now(event, subject, reason="throttled", email=email)
        raise ResourceExhausted(
            "too many failed sign-ins; try again later",
            retry_after=math.ceil(wait),
            reason="LOGIN_THROTTLED",
        )

    async def succeeded(self, session: AsyncSession, guess: Guess) -> None:
        """The guess was right (in the transaction that acts on it): the email's count of
        failures starts again after it."""
        await store.mark_attempt_succeeded(session, guess.attempt_id)
        guess.settled = True

    @staticmethod
    def failed(guess: Guess) -> None:
        """The guess was wrong: the reservation stays, as the failure it already is."""
        guess.settled = True

    async def give_back(self, guess: Guess) -> None:
        """The call ended without a wrong guess: the reservation no longer counts."""
        if guess.settled:
            return
        async with self.deps.transaction() as session:
            await store.delete_attempt(session, guess.attempt_id)
        guess.settled = True
