"""Turning MFA on and off: enrol a TOTP secret, confirm it with a code, disable it."""

from __future__ import annotations

from dataclasses import dataclass

from learnmesh import audit
from learnmesh.kernel import principal
from learnmesh.kernel.errors import FailedPrecondition, InvalidArgument
from services.auth import mfa, store
from services.auth.deps import Deps
from services.auth.second_factor import BAD_MFA_CODE, SecondFactor
from services.auth.throttle import Throttle


@dataclass(frozen=True)
class MfaEnrolment:
    secret: str
    otpauth_uri: str


class MfaSettings:
    def __init__(self, deps: Deps, throttle: Throttle, second_factor: SecondFactor) -> None:
        self.deps = deps
        self.throttle = throttle
        self.second_factor = second_factor

    async def enroll(self) -> MfaEnrolment:
        deps = self.deps
        caller = principal.current()
        async with deps.transaction() as session:
            credentials = await store.credentials_by_user(session, caller.user_id)
            if credentials is None:
                raise FailedPrecondition("this account has no credentials")
            existing = await store.mfa_of(session, caller.user_id)
            if existing is not None and existing.enabled:
                raise FailedPrecondition(
                    "MFA is already on; disable it first to enrol a new secret",
                    reason="MFA_ALREADY_ENABLED",
                )
            secret = mfa.new_secret()
            sealed = deps.box.seal(caller.user_id, secret)
            await store.put_pending_mfa(session, caller.user_id, sealed.key_id, sealed.ciphertext)
        return MfaEnrolment(secret, mfa.otpauth_uri(secret, credentials.email))

    async def confirm(self, code: str) -> None:
        caller = principal.current()
        async with self.deps.transaction() as session:
            row = await store.mfa_of(session, caller.user_id)
        if row is None:
            raise FailedPrecondition("no MFA enrolment is pending; call EnrollMfa first")
        if row.enabled:
            raise FailedPrecondition("MFA is already on", reason="MFA_ALREADY_ENABLED")
        if not await self.second_factor.accept_code(row, code, enable=True):
            raise InvalidArgument.field("code", BAD_MFA_CODE)

    async def disable(self, code: str) -> None:
        """Turns MFA off with a current code; wrong codes count as failed sign-ins for the
        email, so a stolen access token cannot be used to guess codes."""
        deps = self.deps
        caller = principal.current()
        address = principal.call_info().client_address
        async with deps.transaction() as session:
            credentials = await store.credentials_by_user(session, caller.user_id)
            row = await store.mfa_of(session, caller.user_id)
        if credentials is None or row is None or not row.enabled:
            raise FailedPrecondition("MFA is not on", reason="MFA_NOT_ENABLED")
        guess = await self.throttle.reserve(
            credentials.email, address, event="mfa.code_rejected", subject=caller.user_id
        )
        try:
            if not await self.second_factor.accept_code(row, code):
                self.throttle.failed(guess)
                await deps.audit_now("mfa.code_rejected", caller.user_id, action="disable")
                raise InvalidArgument.field("code", BAD_MFA_CODE)
        finally:
            await self.throttle.give_back(guess)
        async with deps.transaction() as session:
            await store.delete_mfa(session, caller.user_id)
            await audit.record(session, store.audit, "mfa.disabled", caller.user_id)
