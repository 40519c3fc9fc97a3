"""Password reset: a single-use token mailed to the account, then a new password with it.

Whether an account has the email must not show, neither in the answer nor in its timing:
RequestPasswordReset only hands the email to a background task owned by the service and
answers, so both paths do the same (no) database work before the answer. The task looks
the account up, makes the token (counted against the hourly limit atomically), audits and
mails; ``aclose`` drains the tasks when the server stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any, NoReturn

from sqlalchemy.ext.asyncio import AsyncSession

from learnmesh import audit
from learnmesh.db import utcnow
from learnmesh.eventing.outbox import emit
from learnmesh.events.v1 import events_pb2
from learnmesh.kernel.errors import InvalidArgument
from learnmesh.mail import Mailer
from services.auth import store
from services.auth.deps import Deps
from services.auth.sessions import revoke
from services.auth.tokens import digest, new_refresh_token

log = logging.getLogger("learnmesh.auth")

BAD_RESET_TOKEN = "the reset token is invalid or has expired"
RESET_SUBJECT = "Reset your learnmesh password"
# Background requests at most in flight (beyond: dropped with a warning, as a flood), and
# at most doing database work at once.
MAX_PENDING = 1000
MAX_CONCURRENT = 4
DRAIN_SECONDS = 5.0


class PasswordResets:
    def __init__(self, deps: Deps, mailer: Mailer) -> None:
        self.deps = deps
        self.mailer = mailer
        self._background: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)

    async def request(self, email: str) -> None:
        """Queues the request and answers at once, the same for every email."""
        if len(self._background) >= MAX_PENDING:
            log.warning("password-reset requests are piling up; one was dropped")
            return
        self._in_background(self._handle(email.lower()), "a password-reset request")

    async def _handle(self, email: str) -> None:
        """Mails a reset token when an active account has ``email`` (in the background,
        with the request's call context, so the audit row names its caller)."""
        async with self._slots:
            token = await self._issue(email)
        if token:
            await self._mail(email, token)

    async def _issue(self, email: str) -> str:
        """A new reset token for the account with ``email``, or "" (no such active
        account, or its hourly limit reached); the count and the insert are one
        serialised step, so concurrent requests cannot pass the limit."""
        deps = self.deps
        async with deps.serialised(f"auth.password_reset:{email}") as session:
            credentials = await store.credentials_by_email(session, email)
            if credentials is None or credentials.status != store.ACTIVE:
                await audit.record(
                    session, store.audit, "password_reset.unknown_email", "", email=email
                )
                return ""
            hour_ago = utcnow() - timedelta(hours=1)
            recent = await store.count_resets_since(session, credentials.user_id, hour_ago)
            if recent >= deps.settings.reset_requests_per_hour:
                await audit.record(
                    session,
                    store.audit,
                    "password_reset.ignored",
                    credentials.user_id,
                    reason="hourly_limit",
                )
                return ""
            token, token_hash = new_refresh_token()
            expires_at = utcnow() + timedelta(seconds=deps.settings.reset_token_ttl)
            await store.add_reset(session, credentials.user_id, token_hash, expires_at)
            await audit.record(
                session, store.audit, "password_reset.requested", credentials.user_id
            )
            # Here, in the background task, never before the answer: the call takes the
            # same time whether or not an account has the email.
            requested = events_pb2.PasswordResetRequested(
                user_id=credentials.user_id, email=credentials.email
            )
            await emit(
                session,
                store.events.outbox,
                "password.reset_requested",
                credentials.user_id,
                requested,
            )
        return token

    async def _mail(self, email: str, token: str) -> None:
        settings = self.deps.settings
        link = f"{settings.public_url.rstrip('/')}/reset-password?token={token}"
        minutes = max(settings.reset_token_ttl // 60, 1)
        body = (
            "Someone asked to reset the password of your learnmesh account.\n\n"
            f"To choose a new password, open this link within {minutes} minutes:\n"
            f"{link}\n\n"
            "Or enter this token where you asked for the reset:\n"
            f"Token: {token}\n\n"
            "If you did not ask for this, ignore this mail: your password stays as it is.\n"
        )
        await self.mailer.send(email, RESET_SUBJECT, body)

    def _in_background(self, work: Coroutine[Any, Any, None], what: str) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("could not write %s", what)

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def reset(self, token: str, new_password: str) -> None:
        """Sets the new password with a single-use token and ends every session."""
        deps = self.deps
        async with deps.transaction() as session:
            found = await store.reset_by_hash(session, digest(token))
        if found is None:
            await self._rejected("", "unknown")
        if found.used_at is not None:
            await self._rejected(found.user_id, "used")
        if found.expires_at <= utcnow():
            await self._rejected(found.user_id, "expired")
        new_hash = await deps.passwords.hash(new_password)
        async with deps.transaction() as session:
            credentials = await store.credentials_by_user(session, found.user_id)
            if credentials is None or credentials.status != store.ACTIVE:
                reason = "no_active_account"
            elif not await store.use_reset(session, found.id):
                reason = "used"  # a concurrent ResetPassword spent it first
            else:
                reason = ""
            if not reason:
                await self._apply(session, found.user_id, new_hash)
        if reason:
            await self._rejected(found.user_id, reason)

    async def _rejected(self, subject: str, reason: str) -> NoReturn:
        """Audits a refused reset token (committed) and fails the call on the token field,
        with the one same message whatever the reason."""
        await self.deps.audit_now("password_reset.token_rejected", subject, reason=reason)
        raise InvalidArgument.field("token", BAD_RESET_TOKEN)

    async def _apply(self, session: AsyncSession, user_id: str, new_hash: str) -> None:
        """The new password, every other reset token spent, every session ended."""
        await store.retire_resets(session, user_id)
        await store.set_password_hash(session, user_id, new_hash)
        revoked = await revoke(
            session, user_id, "password_reset", access_ttl=self.deps.settings.access_token_ttl
        )
        await audit.record(
            session, store.audit, "password.reset", user_id, sessions_revoked=len(revoked)
        )

    async def aclose(self) -> None:
        """Lets queued requests and mail writes finish (briefly) when the server stops;
        what is left after that is cancelled, so the stop never hangs."""
        if not self._background:
            return
        _, late = await asyncio.wait(list(self._background), timeout=DRAIN_SECONDS)
        for task in late:
            log.warning("a password-reset request was still running at stop; cancelled")
            task.cancel()
        if late:
            await asyncio.wait(late)
