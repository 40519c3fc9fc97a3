"""Sign-in: email and password, then the second factor when MFA is on; and its throttle.

Unknown emails cost a dummy argon2 verify, so they take as long as wrong passwords, and
both fail with the one same message.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import NoReturn

from learnmesh import audit
from learnmesh.db import utcnow
from learnmesh.kernel import principal
from learnmesh.kernel.errors import ResourceExhausted, Unauthenticated
from services.auth import store
from services.auth.deps import Deps
from services.auth.second_factor import SecondFactor
from services.auth.sessions import Sessions, SignedIn

BAD_CREDENTIALS = "email or password is incorrect"


def _retry_after(failures: Sequence[datetime], limit: int, window: int, now: datetime) -> float:
    """Seconds until fewer than ``limit`` of ``failures`` (oldest first) are in the window."""
    if len(failures) < limit:
        return 0.0
    leaves_at = failures[len(failures) - limit] + timedelta(seconds=window)
    return max((leaves_at - now).total_seconds(), 1.0)


class Throttle:
    """Failed sign-ins per email and per client address within a window."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def window_start(self) -> datetime:
        return utcnow() - timedelta(seconds=self.deps.settings.throttle_window)

    async def check(
        self, email: str, address: str, *, event: str = "login.failed", subject: str = ""
    ) -> None:
        """RESOURCE_EXHAUSTED while too many recent failures for the email or the address
        (checked before the password, so a locked account cannot be probed); the refused
        attempt is audited as ``event``."""
        settings = self.deps.settings
        now = utcnow()
        since = self.window_start()
        async with self.deps.transaction() as session:
            by_email = await store.email_failures_since(session, email, since)
            by_address = (
                await store.address_failures_since(session, address, since) if address else []
            )
        window = settings.throttle_window
        wait = max(
            _retry_after(by_email, settings.throttle_per_email, window, now),
            _retry_after(by_address, settings.throttle_per_address, window, now),
        )
        if wait <= 0:
            return
        await self.deps.audit_now(event, subject, reason="throttled", email=email)
        raise ResourceExhausted(
            "too many failed sign-ins; try again later",
            retry_after=math.ceil(wait),
            reason="LOGIN_THROTTLED",
        )

    async def record_failure(self, email: str, address: str) -> None:
        async with self.deps.transaction() as session:
            await store.add_attempt(
                session, email, address, succeeded=False, prune_before=self.window_start()
            )


class SignIn:
    def __init__(
        self, deps: Deps, throttle: Throttle, second_factor: SecondFactor, sessions: Sessions
    ) -> None:
        self.deps = deps
        self.throttle = throttle
        self.second_factor = second_factor
        self.sessions = sessions

    async def login(self, email: str, password: str, mfa_code: str) -> SignedIn:
        deps = self.deps
        email = email.lower()
        address = principal.call_info().client_address
        await self.throttle.check(email, address)
        async with deps.transaction() as session:
            credentials = await store.credentials_by_email(session, email)
            second_factor = (
                await store.mfa_of(session, credentials.user_id) if credentials else None
            )
        if credentials is None or credentials.status != store.ACTIVE:
            await deps.passwords.verify_dummy(password)
            await self._failed(email, "", "unknown_email")
        user_id = credentials.user_id
        if not await deps.passwords.verify(credentials.password_hash, password):
            await self._failed(email, user_id, "password")
        uses_mfa = second_factor is not None and second_factor.enabled
        if second_factor is not None and second_factor.enabled:
            if not mfa_code:
                # Not a failure: the password was right, the client asks for the code next.
                raise Unauthenticated(
                    "this account has MFA on: send the current code in mfa_code",
                    reason="MFA_REQUIRED",
                )
            if not await self.second_factor.accept_code(second_factor, mfa_code):
                await self._failed(email, user_id, "mfa")
        user = await deps.users.get(user_id)
        if user is None:
            raise Unauthenticated("this account no longer exists", reason="ACCOUNT_DELETED")
        new_hash = None
        if deps.passwords.needs_rehash(credentials.password_hash):
            new_hash = await deps.passwords.hash(password)
        async with deps.transaction() as session:
            if new_hash is not None:
                await store.set_password_hash(
                    session, user_id, new_hash, replacing=credentials.password_hash
                )
            signed_in = await self.sessions.start(session, user_id, user)
            await store.add_attempt(
                session, email, address, succeeded=True, prune_before=self.throttle.window_start()
            )
            await audit.record(
                session,
                store.audit,
                "login.succeeded",
                user_id,
                session_id=signed_in.session_id,
                mfa=uses_mfa,
            )
        return signed_in

    async def _failed(self, email: str, user_id: str, reason: str) -> NoReturn:
        """Records the failure (committed) and fails the call with the one same message."""
        address = principal.call_info().client_address
        async with self.deps.transaction() as session:
            await store.add_attempt(
                session, email, address, succeeded=False, prune_before=self.throttle.window_start()
            )
            await audit.record(
                session, store.audit, "login.failed", user_id, reason=reason, email=email
            )
        raise Unauthenticated(BAD_CREDENTIALS, reason="INVALID_CREDENTIALS")
