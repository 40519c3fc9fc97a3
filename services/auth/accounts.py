"""The auth service's rules: registration, sign-in, sessions, MFA and password reset.

The servicer converts protos to calls on ``Accounts`` and back; the rules live here, SQL in
``store``. Events a defender needs later (failed sign-ins, refresh-token reuse, MFA and
password changes, revoked sessions) go to the append-only ``auth_audit`` table. A failure
event is written in its own transaction that commits before the call fails, so the
rollback of the failing call cannot lose it.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NoReturn

import grpc
from grpc import aio
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from learnmesh import audit
from learnmesh.config import AuthSettings
from learnmesh.db import utcnow
from learnmesh.kernel import principal
from learnmesh.kernel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from learnmesh.mail import Mailer
from learnmesh.service import Runtime
from learnmesh.user.v1 import user_pb2
from services.auth import mfa, store
from services.auth.keys import KeyRing
from services.auth.passwords import Passwords
from services.auth.tokens import Tokens, digest, new_refresh_token

log = logging.getLogger("learnmesh.auth")

ACCOUNT_EXISTS = "an account with this email already exists"
BAD_CREDENTIALS = "email or password is incorrect"
BAD_REFRESH_TOKEN = "the refresh token is not valid; sign in again"
BAD_RESET_TOKEN = "the reset token is invalid or has expired"
BAD_MFA_CODE = "the code is wrong, expired or was already used"
RESET_SUBJECT = "Reset your learnmesh password"
USER_SERVICE_TIMEOUT = 5.0
# Codes after which the user service may or may not have created the profile: the pending
# registration is kept, so the next Register of the email retries with the same user id
# (CreateUser is idempotent by id) instead of leaving an orphaned profile behind.
_MAYBE_CREATED = {
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}


@dataclass(frozen=True)
class SignedIn:
    user: user_pb2.User
    access_token: str
    refresh_token: str
    expires_in: int
    session_id: str


@dataclass(frozen=True)
class SessionInfo:
    id: str
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    client_address: str
    user_agent: str
    current: bool


@dataclass(frozen=True)
class MfaEnrolment:
    secret: str
    otpauth_uri: str


@dataclass(frozen=True)
class Introspection:
    active: bool
    subject: str = ""
    roles: tuple[str, ...] = ()
    tier: str = ""
    expires_at: int = 0
    session_id: str = ""


def roles_of(user: user_pb2.User) -> list[str]:
    """``ROLE_FREE_USER`` → ``["free_user"]``; no role → no roles."""
    if user.role == user_pb2.ROLE_UNSPECIFIED:
        return []
    return [user_pb2.Role.Name(user.role).removeprefix("ROLE_").lower()]


def tier_of(user: user_pb2.User) -> str:
    if user.tier == user_pb2.SUBSCRIPTION_TIER_UNSPECIFIED:
        return "free"
    return user_pb2.SubscriptionTier.Name(user.tier).removeprefix("SUBSCRIPTION_TIER_").lower()


def _retry_after(failures: Sequence[datetime], limit: int, window: int, now: datetime) -> float:
    """Seconds until fewer than ``limit`` of ``failures`` (oldest first) are in the window."""
    if len(failures) < limit:
        return 0.0
    leaves_at = failures[len(failures) - limit] + timedelta(seconds=window)
    return max((leaves_at - now).total_seconds(), 1.0)


@dataclass
class Accounts:
    runtime: Runtime
    passwords: Passwords
    keys: KeyRing
    tokens: Tokens
    box: mfa.SecretBox
    mailer: Mailer
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def settings(self) -> AuthSettings:
        return self.runtime.settings.auth

    def _transaction(self) -> Any:
        return self.runtime.db.transaction()

    # --- registration and sign-in ---------------------------------------------------------

    async def register(self, email: str, password: str, display_name: str) -> SignedIn:
        """Creates the credentials, then the profile (user service), then signs in."""
        email = email.lower()
        password_hash = await self.passwords.hash(password)
        user_id = await self._reserve(email, password_hash)
        try:
            created = await self.runtime.clients.stub("user").CreateUser(
                user_pb2.CreateUserRequest(user_id=user_id, email=email, display_name=display_name),
                timeout=USER_SERVICE_TIMEOUT,
            )
        except aio.AioRpcError as exc:
            code = exc.code()
            log.warning("CreateUser failed for a registration: %s", code.name)
            if code not in _MAYBE_CREATED:
                async with self._transaction() as session:
                    await store.delete_pending(session, user_id, password_hash)
            if code == grpc.StatusCode.ALREADY_EXISTS:
                raise AlreadyExists(ACCOUNT_EXISTS) from None
            raise Unavailable("the account cannot be created right now; try again") from None
        async with self._transaction() as session:
            if not await store.activate(session, user_id, password_hash):
                # A concurrent Register of the same email took the pending row over.
                raise AlreadyExists(ACCOUNT_EXISTS)
            signed_in = await self._sign_in(session, user_id, created.user)
            await audit.record(
                session, store.audit, "account.registered", user_id, session_id=signed_in.session_id
            )
        return signed_in

    async def _reserve(self, email: str, password_hash: str) -> str:
        """Commits a pending credentials row for ``email`` (or takes over one a crash left
        behind) and returns its user id; the unique email decides races."""
        try:
            async with self._transaction() as session:
                existing = await store.credentials_by_email(session, email)
                if existing is None:
                    user_id = store.new_id()
                    await store.add_pending_credentials(session, user_id, email, password_hash)
                    return user_id
                if existing.status == store.ACTIVE:
                    raise AlreadyExists(ACCOUNT_EXISTS)
                if not await store.take_over_pending(session, existing.user_id, password_hash):
                    raise AlreadyExists(ACCOUNT_EXISTS)
                return existing.user_id
        except IntegrityError:
            raise AlreadyExists(ACCOUNT_EXISTS) from None

    async def login(self, email: str, password: str, mfa_code: str) -> SignedIn:
        email = email.lower()
        address = principal.call_info().client_address
        await self._check_throttle(email, address)
        async with self._transaction() as session:
            credentials = await store.credentials_by_email(session, email)
            second_factor = (
                await store.mfa_of(session, credentials.user_id) if credentials else None
            )
        if credentials is None or credentials.status != store.ACTIVE:
            await self.passwords.verify_dummy(password)
            await self._login_failed(email, "", "unknown_email")
        user_id = credentials.user_id
        if not await self.passwords.verify(credentials.password_hash, password):
            await self._login_failed(email, user_id, "password")
        uses_mfa = second_factor is not None and second_factor.enabled
        if second_factor is not None and second_factor.enabled:
            if not mfa_code:
                # Not a failure: the password was right, the client asks for the code next.
                raise Unauthenticated(
                    "this account has MFA on: send the current code in mfa_code",
                    reason="MFA_REQUIRED",
                )
            if not await self._accept_code(second_factor, mfa_code):
                await self._login_failed(email, user_id, "mfa")
        user = await self._profile(user_id)
        if user is None:
            raise Unauthenticated("this account no longer exists", reason="ACCOUNT_DELETED")
        new_hash = None
        if self.passwords.needs_rehash(credentials.password_hash):
            new_hash = await self.passwords.hash(password)
        async with self._transaction() as session:
            if new_hash is not None:
                await store.set_password_hash(
                    session, user_id, new_hash, replacing=credentials.password_hash
                )
            signed_in = await self._sign_in(session, user_id, user)
            await store.add_attempt(
                session, email, address, succeeded=True, prune_before=self._window_start()
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

    def _window_start(self) -> datetime:
        return utcnow() - timedelta(seconds=self.settings.throttle_window)

    async def _check_throttle(
        self, email: str, address: str, *, event: str = "login.failed", subject: str = ""
    ) -> None:
        """RESOURCE_EXHAUSTED while too many recent failures for the email or the address
        (checked before the password, so a locked account cannot be probed); the refused
        attempt is audited as ``event``."""
        now = utcnow()
        since = self._window_start()
        async with self._transaction() as session:
            by_email = await store.email_failures_since(session, email, since)
            by_address = (
                await store.address_failures_since(session, address, since) if address else []
            )
        window = self.settings.throttle_window
        wait = max(
            _retry_after(by_email, self.settings.throttle_per_email, window, now),
            _retry_after(by_address, self.settings.throttle_per_address, window, now),
        )
        if wait <= 0:
            return
        async with self._transaction() as session:
            await audit.record(
                session, store.audit, event, subject, reason="throttled", email=email
            )
        raise ResourceExhausted(
            "too many failed sign-ins; try again later",
            retry_after=math.ceil(wait),
            reason="LOGIN_THROTTLED",
        )

    async def _login_failed(self, email: str, user_id: str, reason: str) -> NoReturn:
        """Records the failure (committed) and fails the call with the one same message."""
        address = principal.call_info().client_address
        async with self._transaction() as session:
            await store.add_attempt(
                session, email, address, succeeded=False, prune_before=self._window_start()
            )
            await audit.record(
                session, store.audit, "login.failed", user_id, reason=reason, email=email
            )
        raise Unauthenticated(BAD_CREDENTIALS, reason="INVALID_CREDENTIALS")

    async def _accept_code(self, row: store.Mfa, code: str, *, enable: bool = False) -> bool:
        """True when ``code`` is good now and its step was not used before; the step is
        claimed atomically, so the same code cannot win twice even concurrently."""
        secret = self._open_secret(row)
        step = mfa.matching_step(secret, code, row.last_step)
        if step < 0:
            return False
        async with self._transaction() as session:
            if not await store.claim_step(session, row.user_id, step, enable=enable):
                return False
            if row.key_id != self.box.encrypt_kid:
                # Re-encrypt under the newest key, so an old key can be retired.
                sealed = self.box.seal(row.user_id, secret)
                await store.reseal_mfa(session, row.user_id, sealed.key_id, sealed.ciphertext)
            if enable:
                await audit.record(session, store.audit, "mfa.enabled", row.user_id)
        return True

    def _open_secret(self, row: store.Mfa) -> str:
        try:
            return self.box.open(row.user_id, mfa.Sealed(row.key_id, row.ciphertext))
        except (KeyError, mfa.InvalidTag):
            # A missing or wrong key is an operator problem; never a reason to let anyone in.
            log.error(
                "cannot decrypt the MFA secret of user %s (key id %s)", row.user_id, row.key_id
            )
            raise RuntimeError("MFA secret cannot be decrypted") from None

    async def _profile(self, user_id: str) -> user_pb2.User | None:
        """The user's profile from the user service, or None when it no longer exists."""
        try:
            response = await self.runtime.clients.stub("user").BatchGetUsers(
                user_pb2.BatchGetUsersRequest(user_ids=[user_id]), timeout=USER_SERVICE_TIMEOUT
            )
        except aio.AioRpcError as exc:
            log.warning("BatchGetUsers failed: %s", exc.code().name)
            raise Unavailable("the user service is unavailable; try again") from None
        for user in response.users:
            if user.id == user_id:
                return user
        return None

    async def _sign_in(self, session: AsyncSession, user_id: str, user: user_pb2.User) -> SignedIn:
        """A new session (refresh-token family) with its first token pair."""
        call = principal.call_info()
        row = await store.add_session(
            session,
            user_id,
            ttl_seconds=self.settings.refresh_token_ttl,
            client_address=call.client_address,
            user_agent=call.user_agent,
        )
        refresh_token, token_hash = new_refresh_token()
        await store.add_refresh_token(session, row.id, token_hash, row.expires_at)
        access = await self.tokens.issue(user_id, roles_of(user), tier_of(user), row.id)
        return SignedIn(user, access.token, refresh_token, access.expires_in, row.id)

    # --- refresh tokens and sessions -------------------------------------------------------

    async def refresh(self, refresh_token: str) -> SignedIn:
        """Spends the refresh token for a new pair in the same session (RFC 9700 §4.14.2:
        a spent token presented again ends the whole session)."""
        async with self._transaction() as session:
            found = await store.refresh_token_by_hash(session, digest(refresh_token))
        if found is None:
            raise Unauthenticated(BAD_REFRESH_TOKEN, reason="INVALID_REFRESH_TOKEN")
        owner = found.session
        if found.spent_at is not None:
            await self._reuse_detected(owner)
        if owner.revoked_at is not None:
            raise Unauthenticated("the session has ended; sign in again", reason="SESSION_ENDED")
        now = utcnow()
        if found.expires_at <= now or owner.expires_at <= now:
            raise Unauthenticated(
                "the refresh token has expired; sign in again", reason="REFRESH_TOKEN_EXPIRED"
            )
        user = await self._profile(owner.user_id)
        if user is None:
            async with self._transaction() as session:
                await self._revoke(session, owner.user_id, "account_deleted", [owner.id])
            raise Unauthenticated("this account no longer exists", reason="ACCOUNT_DELETED")
        signed_in: SignedIn | None = None
        async with self._transaction() as session:
            if await store.spend_refresh_token(session, found.token_id):
                current = await store.session_by_id(session, owner.id)
                if current is not None and current.revoked_at is None:
                    new_token, token_hash = new_refresh_token()
                    await store.add_refresh_token(session, owner.id, token_hash, owner.expires_at)
                    await store.touch_session(session, owner.id)
                    access = await self.tokens.issue(
                        owner.user_id, roles_of(user), tier_of(user), owner.id
                    )
                    signed_in = SignedIn(user, access.token, new_token, access.expires_in, owner.id)
        if signed_in is None:
            # Another call spent the token between our read and our update: that is reuse.
            await self._reuse_detected(owner)
        return signed_in

    async def _reuse_detected(self, owner: store.Session) -> NoReturn:
        async with self._transaction() as session:
            await audit.record(
                session, store.audit, "refresh_token.reused", owner.user_id, session_id=owner.id
            )
            await self._revoke(session, owner.user_id, "refresh_token_reuse", [owner.id])
        raise Unauthenticated(
            "this refresh token was already used; its session has been ended, sign in again",
            reason="REFRESH_TOKEN_REUSED",
        )

    async def _revoke(
        self,
        session: AsyncSession,
        user_id: str,
        reason: str,
        session_ids: Sequence[str] | None = None,
    ) -> list[str]:
        """Revokes live sessions and audits each one."""
        revoked = await store.revoke_sessions(session, user_id, reason, session_ids=session_ids)
        for session_id in revoked:
            await audit.record(
                session,
                store.audit,
                "session.revoked",
                user_id,
                actor=self._actor(user_id),
                session_id=session_id,
                reason=reason,
            )
        return revoked

    @staticmethod
    def _actor(subject: str) -> str:
        caller = principal.current_or_none()
        return caller.user_id if caller is not None and caller.user_id != subject else ""

    async def logout(self, refresh_token: str, all_sessions: bool) -> int:
        caller = principal.current()
        async with self._transaction() as session:
            if all_sessions:
                revoked = await self._revoke(session, caller.user_id, "logout_all")
            elif refresh_token:
                found = await store.refresh_token_by_hash(session, digest(refresh_token))
                if found is None or found.session.user_id != caller.user_id:
                    raise NotFound("no session of yours has this refresh token")
                revoked = await self._revoke(session, caller.user_id, "logout", [found.session.id])
            else:
                ids = [caller.session_id] if caller.session_id else []
                revoked = await self._revoke(session, caller.user_id, "logout", ids)
        return len(revoked)

    async def list_sessions(self) -> list[SessionInfo]:
        caller = principal.current()
        async with self._transaction() as session:
            rows = await store.live_sessions(session, caller.user_id)
        return [
            SessionInfo(
                id=row.id,
                created_at=row.created_at,
                last_used_at=row.last_used_at,
                expires_at=row.expires_at,
                client_address=row.client_address,
                user_agent=row.user_agent,
                current=row.id == caller.session_id,
            )
            for row in rows
        ]

    async def revoke_session(self, session_id: str) -> None:
        caller = principal.current()
        async with self._transaction() as session:
            row = await store.session_by_id(session, session_id)
            if row is None or row.user_id != caller.user_id:
                raise NotFound(f"you have no session {session_id}")
            await self._revoke(session, caller.user_id, "revoked_by_user", [session_id])

    # --- MFA -------------------------------------------------------------------------------

    async def enroll_mfa(self) -> MfaEnrolment:
        caller = principal.current()
        async with self._transaction() as session:
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
            sealed = self.box.seal(caller.user_id, secret)
            await store.put_pending_mfa(session, caller.user_id, sealed.key_id, sealed.ciphertext)
        return MfaEnrolment(secret, mfa.otpauth_uri(secret, credentials.email))

    async def confirm_mfa(self, code: str) -> None:
        caller = principal.current()
        async with self._transaction() as session:
            row = await store.mfa_of(session, caller.user_id)
        if row is None:
            raise FailedPrecondition("no MFA enrolment is pending; call EnrollMfa first")
        if row.enabled:
            raise FailedPrecondition("MFA is already on", reason="MFA_ALREADY_ENABLED")
        if not await self._accept_code(row, code, enable=True):
            raise InvalidArgument.field("code", BAD_MFA_CODE)

    async def disable_mfa(self, code: str) -> None:
        """Turns MFA off with a current code; wrong codes count as failed sign-ins for the
        email, so a stolen access token cannot be used to guess codes."""
        caller = principal.current()
        address = principal.call_info().client_address
        async with self._transaction() as session:
            credentials = await store.credentials_by_user(session, caller.user_id)
            row = await store.mfa_of(session, caller.user_id)
        if credentials is None or row is None or not row.enabled:
            raise FailedPrecondition("MFA is not on", reason="MFA_NOT_ENABLED")
        await self._check_throttle(
            credentials.email, address, event="mfa.code_rejected", subject=caller.user_id
        )
        if not await self._accept_code(row, code):
            async with self._transaction() as session:
                await store.add_attempt(
                    session,
                    credentials.email,
                    address,
                    succeeded=False,
                    prune_before=self._window_start(),
                )
                await audit.record(
                    session, store.audit, "mfa.code_rejected", caller.user_id, action="disable"
                )
            raise InvalidArgument.field("code", BAD_MFA_CODE)
        async with self._transaction() as session:
            await store.delete_mfa(session, caller.user_id)
            await audit.record(session, store.audit, "mfa.disabled", caller.user_id)

    # --- password reset --------------------------------------------------------------------

    async def request_password_reset(self, email: str) -> None:
        """Mails a reset token when an active account has ``email``; says nothing either way."""
        email = email.lower()
        token = ""
        async with self._transaction() as session:
            credentials = await store.credentials_by_email(session, email)
            if credentials is None or credentials.status != store.ACTIVE:
                return
            hour_ago = utcnow() - timedelta(hours=1)
            recent = await store.count_resets_since(session, credentials.user_id, hour_ago)
            if recent >= self.settings.reset_requests_per_hour:
                log.info("password-reset request ignored: hourly limit reached for an account")
                return
            token, token_hash = new_refresh_token()
            expires_at = utcnow() + timedelta(seconds=self.settings.reset_token_ttl)
            await store.add_reset(session, credentials.user_id, token_hash, expires_at)
            await audit.record(
                session, store.audit, "password_reset.requested", credentials.user_id
            )
        # After the commit, and off the answer's path: the caller must not be able to tell
        # from the timing whether a mail was written.
        self._in_background(self._mail_reset(email, token), "the password-reset mail")

    async def _mail_reset(self, email: str, token: str) -> None:
        link = f"{self.settings.public_url.rstrip('/')}/reset-password?token={token}"
        minutes = max(self.settings.reset_token_ttl // 60, 1)
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

    async def reset_password(self, token: str, new_password: str) -> None:
        """Sets the new password with a single-use token and ends every session."""
        async with self._transaction() as session:
            reset = await store.usable_reset(session, digest(token))
        if reset is None:
            raise InvalidArgument.field("token", BAD_RESET_TOKEN)
        new_hash = await self.passwords.hash(new_password)
        async with self._transaction() as session:
            credentials = await store.credentials_by_user(session, reset.user_id)
            if credentials is None or credentials.status != store.ACTIVE:
                raise InvalidArgument.field("token", BAD_RESET_TOKEN)
            if not await store.use_reset(session, reset.id):
                raise InvalidArgument.field("token", BAD_RESET_TOKEN)
            await store.retire_resets(session, reset.user_id)
            await store.set_password_hash(session, reset.user_id, new_hash)
            revoked = await self._revoke(session, reset.user_id, "password_reset")
            await audit.record(
                session, store.audit, "password.reset", reset.user_id, sessions_revoked=len(revoked)
            )

    # --- keys and introspection ------------------------------------------------------------

    async def jwks(self) -> list[dict[str, str]]:
        return await self.keys.jwks()

    async def introspect(self, token: str) -> Introspection:
        """Whether the access token is good now, its session included; never an error."""
        verified = await self.tokens.verify(token)
        if verified is None:
            return Introspection(active=False)
        async with self._transaction() as session:
            owner = await store.session_by_id(session, verified.session_id)
        if owner is None or owner.revoked_at is not None or owner.user_id != verified.subject:
            return Introspection(active=False)
        return Introspection(
            active=True,
            subject=verified.subject,
            roles=verified.roles,
            tier=verified.tier,
            expires_at=verified.expires_at,
            session_id=verified.session_id,
        )

    async def aclose(self) -> None:
        """Lets background mail writes finish (briefly) when the server stops."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=5)


async def build(runtime: Runtime) -> Accounts:
    """Loads or makes the keys, and the dummy password hash, before serving."""
    settings = runtime.settings
    passwords = Passwords(settings.auth)
    await passwords.start()
    keys = KeyRing(settings)
    await keys.start()
    box = await asyncio.to_thread(mfa.SecretBox.from_settings, settings)
    return Accounts(
        runtime=runtime,
        passwords=passwords,
        keys=keys,
        tokens=Tokens(keys, settings.auth),
        box=box,
        mailer=Mailer(settings.var_dir),
    )
