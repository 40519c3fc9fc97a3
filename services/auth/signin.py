"""Sign-in: email and password, then the second factor when MFA is on.

Every attempt is a guess reserved in the throttle before anything is verified (see
``throttle``). Unknown emails cost a dummy argon2 verify, so they take as long as wrong
passwords, and both fail with the one same message.
"""

from __future__ import annotations

from typing import NoReturn

from learnmesh import audit
from learnmesh.eventing.outbox import emit
from learnmesh.events.v1 import events_pb2
from learnmesh.kernel import principal
from learnmesh.kernel.errors import InvalidArgument, Unauthenticated
from services.auth import store
from services.auth.deps import Deps
from services.auth.second_factor import SecondFactor
from services.auth.sessions import Sessions, SignedIn
from services.auth.throttle import Guess, Throttle

BAD_CREDENTIALS = "email or password is incorrect"


class SignIn:
    def __init__(
        self, deps: Deps, throttle: Throttle, second_factor: SecondFactor, sessions: Sessions
    ) -> None:
        self.deps = deps
        self.throttle = throttle
        self.second_factor = second_factor
        self.sessions = sessions

    async def login(
        self, email: str, password: str, mfa_code: str, recovery_code: str = ""
    ) -> SignedIn:
        if mfa_code and recovery_code:
            raise InvalidArgument.field("recovery_code", "send either mfa_code or recovery_code")
        email = email.lower()
        guess = await self.throttle.reserve(email, principal.call_info().client_address)
        try:
            return await self._attempt(guess, password, mfa_code, recovery_code)
        except Exception:
            # No wrong guess (the code is still to come, the profile is gone, the user
            # service is down...): the reservation is given back. A wrong guess settled it.
            await self.throttle.give_back(guess)
            raise

    async def _attempt(
        self, guess: Guess, password: str, mfa_code: str, recovery_code: str
    ) -> SignedIn:
        deps = self.deps
        email = guess.email
        async with deps.transaction() as session:
            credentials = await store.credentials_by_email(session, email)
            second_factor = (
                await store.mfa_of(session, credentials.user_id) if credentials else None
            )
        if credentials is None or credentials.status != store.ACTIVE:
            await deps.passwords.verify_dummy(password)
            await self._failed(guess, "", "unknown_email")
        user_id = credentials.user_id
        if not await deps.passwords.verify(credentials.password_hash, password):
            await self._failed(guess, user_id, "password")
        uses_mfa = second_factor is not None and second_factor.enabled
        via = ""
        if second_factor is not None and second_factor.enabled:
            if recovery_code:
                via = "recovery_code"
                if not await self.second_factor.spend_recovery_code(user_id, recovery_code):
                    await self._failed(guess, user_id, "recovery_code")
            elif mfa_code:
                via = "totp"
                if not await self.second_factor.accept_code(second_factor, mfa_code):
                    await self._failed(guess, user_id, "mfa")
            else:
                # Not a failure: the password was right, the client asks for the code next.
                raise Unauthenticated(
                    "this account has MFA on: send the current code in mfa_code (or a "
                    "recovery code in recovery_code)",
                    reason="MFA_REQUIRED",
                )
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
            await self.throttle.succeeded(session, guess)
            await audit.record(
                session,
                store.audit,
                "login.succeeded",
                user_id,
                session_id=signed_in.session_id,
                mfa=uses_mfa,
                **({"via": via} if via else {}),
            )
            login = events_pb2.UserLogin(
                user_id=user_id,
                session_id=signed_in.session_id,
                client_address=principal.call_info().client_address,
            )
            await emit(session, store.events.outbox, "user.login", user_id, login)
        return signed_in

    async def _failed(self, guess: Guess, user_id: str, reason: str) -> NoReturn:
        """Audits the failure (committed; the reservation already counts it) and fails the
        call with the one same message."""
        self.throttle.failed(guess)
        await self.deps.audit_now("login.failed", user_id, reason=reason, email=guess.email)
        raise Unauthenticated(BAD_CREDENTIALS, reason="INVALID_CREDENTIALS")
