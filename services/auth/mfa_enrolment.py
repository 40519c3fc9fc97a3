"""Turning MFA on and off: enrol a TOTP secret, confirm it (recovery codes are given then),
disable it; and the admin's and the operator's reset.

An access token alone changes nothing here: every call of the owner's also needs the
current password, checked as a guess in the sign-in throttle (a wrong one counts as a
failed sign-in and is audited), so a stolen token can neither lock the owner out nor
guess codes faster than sign-in allows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from learnmesh import audit
from learnmesh.eventing.outbox import emit
from learnmesh.events.v1 import events_pb2
from learnmesh.kernel import principal
from learnmesh.kernel.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from services.auth import mfa, store
from services.auth.deps import Deps
from services.auth.second_factor import BAD_MFA_CODE, BAD_RECOVERY_CODE, SecondFactor
from services.auth.sessions import revoke
from services.auth.throttle import Guess, Throttle

BAD_PASSWORD = "the password is not this account's current password"
ONE_OF_THE_CODES = "send either code or recovery_code, not both"


@dataclass(frozen=True)
class MfaEnrolment:
    secret: str
    otpauth_uri: str


@dataclass(frozen=True)
class MfaReset:
    had_mfa: bool
    revoked_sessions: int


async def reset_mfa(
    session: AsyncSession, user_id: str, *, actor: str, via: str, access_ttl: int
) -> MfaReset:
    """Removes the user's MFA and recovery codes and ends every session, audited as
    ``mfa.reset`` by ``actor`` (in ``session``'s transaction). Shared by ResetMfa and the
    ``learnmesh users reset-mfa`` command."""
    had_mfa = await store.delete_mfa(session, user_id)
    revoked = await revoke(session, user_id, "mfa_reset", actor=actor, access_ttl=access_ttl)
    await audit.record(
        session,
        store.audit,
        "mfa.reset",
        user_id,
        actor=actor,
        via=via,
        had_mfa=had_mfa,
        sessions_revoked=len(revoked),
    )
    return MfaReset(had_mfa, len(revoked))


class MfaSettings:
    def __init__(self, deps: Deps, throttle: Throttle, second_factor: SecondFactor) -> None:
        self.deps = deps
        self.throttle = throttle
        self.second_factor = second_factor

    async def _mine(self) -> tuple[store.Credentials, store.Mfa | None]:
        caller = principal.current()
        async with self.deps.transaction() as session:
            credentials = await store.credentials_by_user(session, caller.user_id)
            row = await store.mfa_of(session, caller.user_id)
        if credentials is None:
            raise FailedPrecondition("this account has no credentials")
        return credentials, row

    @asynccontextmanager
    async def _password_checked(
        self, credentials: store.Credentials, password: str, action: str
    ) -> AsyncIterator[Guess]:
        """Reserves a guess for the account, checks the password, and yields the guess
        (the block may still mark it failed, for a wrong code); given back afterwards
        unless it was a wrong guess."""
        deps = self.deps
        user_id = credentials.user_id
        guess = await self.throttle.reserve(
            credentials.email,
            principal.call_info().client_address,
            event="mfa.password_rejected",
            subject=user_id,
        )
        try:
            if not await deps.passwords.verify(credentials.password_hash, password):
                self.throttle.failed(guess)
                await deps.audit_now("mfa.password_rejected", user_id, action=action)
                raise InvalidArgument.field("password", BAD_PASSWORD)
            yield guess
        finally:
            await self.throttle.give_back(guess)

    async def enroll(self, password: str) -> MfaEnrolment:
        deps = self.deps
        credentials, existing = await self._mine()
        user_id = credentials.user_id
        if existing is not None and existing.enabled:
            raise FailedPrecondition(
                "MFA is already on; disable it first to enrol a new secret",
                reason="MFA_ALREADY_ENABLED",
            )
        async with self._password_checked(credentials, password, "enroll"):
            secret = mfa.new_secret()
            sealed = deps.box.seal(user_id, secret)
            async with deps.transaction() as session:
                await store.put_pending_mfa(session, user_id, sealed.key_id, sealed.ciphertext)
                await audit.record(session, store.audit, "mfa.enrolment_started", user_id)
        return MfaEnrolment(secret, mfa.otpauth_uri(secret, credentials.email))

    async def confirm(self, code: str, password: str) -> list[str]:
        """Turns MFA on; returns the recovery codes (shown this once). A wrong code here
        is audited but not counted: the secret is the caller's own, just enrolled."""
        credentials, row = await self._mine()
        user_id = credentials.user_id
        if row is None:
            raise FailedPrecondition("no MFA enrolment is pending; call EnrollMfa first")
        if row.enabled:
            raise FailedPrecondition("MFA is already on", reason="MFA_ALREADY_ENABLED")
        codes: list[str] = []

        async def store_codes(session: AsyncSession) -> None:
            codes.extend(await self.second_factor.new_recovery_codes(session, user_id))
            enabled = events_pb2.MfaEnabled(user_id=user_id)
            await emit(session, store.events.outbox, "mfa.enabled", user_id, enabled)

        async with self._password_checked(credentials, password, "confirm"):
            if not await self.second_factor.accept_code(
                row, code, enable=True, on_accept=store_codes
            ):
                await self.deps.audit_now("mfa.code_rejected", user_id, action="confirm")
                raise InvalidArgument.field("code", BAD_MFA_CODE)
        return codes

    async def disable(self, code: str, recovery_code: str, password: str) -> None:
        """Turns MFA off with the password and a current code or a recovery code; a wrong
        code counts as a failed sign-in for the email."""
        if bool(code) == bool(recovery_code):
            raise InvalidArgument(
                [
                    FieldViolation("code", ONE_OF_THE_CODES),
                    FieldViolation("recovery_code", ONE_OF_THE_CODES),
                ]
            )
        deps = self.deps
        credentials, row = await self._mine()
        user_id = credentials.user_id
        if row is None or not row.enabled:
            raise FailedPrecondition("MFA is not on", reason="MFA_NOT_ENABLED")
        async with self._password_checked(credentials, password, "disable") as guess:
            if code:
                accepted = await self.second_factor.accept_code(row, code)
            else:
                accepted = await self.second_factor.spend_recovery_code(user_id, recovery_code)
            if not accepted:
                self.throttle.failed(guess)
                field = "code" if code else "recovery_code"
                await deps.audit_now("mfa.code_rejected", user_id, action="disable", kind=field)
                raise InvalidArgument.field(field, BAD_MFA_CODE if code else BAD_RECOVERY_CODE)
            async with deps.transaction() as session:
                await store.delete_mfa(session, user_id)
                await audit.record(
                    session,
                    store.audit,
                    "mfa.disabled",
                    user_id,
                    via="code" if code else "recovery_code",
                )

    async def reset(self, user_id: str) -> MfaReset:
        """An admin turns a user's MFA off (the access policy admitted only admins)."""
        admin = principal.current()
        async with self.deps.transaction() as session:
            if await store.credentials_by_user(session, user_id) is None:
                raise NotFound(f"no account {user_id}")
            return await reset_mfa(
                session,
                user_id,
                actor=admin.user_id,
                via="rpc",
                access_ttl=self.deps.settings.access_token_ttl,
            )
