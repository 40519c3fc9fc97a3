"""The auth service's tables and the queries on them (SQLite and PostgreSQL alike).

Tables are prefixed ``auth_``. Tokens (refresh, reset) are stored only as SHA-256 digests,
TOTP secrets only encrypted. Times are UTC-aware on the way in and out (SQLite hands back
naive datetimes; ``UtcDateTime`` puts the zone back).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    LargeBinary,
    String,
    and_,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from learnmesh.audit import audit_table
from learnmesh.db import UtcDateTime, utcnow
from learnmesh.eventing.tables import event_tables

PENDING = "pending"
ACTIVE = "active"


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    pass


class Credentials(Base):
    __tablename__ = "auth_credentials"

    user_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # Always lower-case.
    email: Mapped[str] = mapped_column(String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    # "pending" until the profile exists in the user service, then "active".
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Session(Base):
    """A sign-in: one family of refresh tokens."""

    __tablename__ = "auth_sessions"
    __table_args__ = (Index("ix_auth_sessions_user_id", "user_id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_used_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    revoke_reason: Mapped[str] = mapped_column(String(64), default="")
    client_address: Mapped[str] = mapped_column(String(64), default="")
    user_agent: Mapped[str] = mapped_column(String(256), default="")


class RefreshToken(Base):
    __tablename__ = "auth_refresh_tokens"
    __table_args__ = (Index("ix_auth_refresh_tokens_session_id", "session_id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    session_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("auth_sessions.id", ondelete="CASCADE")
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    spent_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class Mfa(Base):
    __tablename__ = "auth_mfa"

    user_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(64))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    # False while enrolment awaits ConfirmMfa.
    enabled: Mapped[bool] = mapped_column(Boolean)
    # The TOTP time step of the last accepted code; only later steps are accepted.
    last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class RecoveryCode(Base):
    """A single-use MFA recovery code, as an HMAC digest (``mfa.SecretBox.recovery_digest``)."""

    __tablename__ = "auth_mfa_recovery_codes"
    __table_args__ = (Index("ix_auth_mfa_recovery_codes_user_id", "user_id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(36))
    # The MFA key the digest's HMAC key was derived from.
    key_id: Mapped[str] = mapped_column(String(64))
    code_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class PasswordReset(Base):
    __tablename__ = "auth_password_resets"
    __table_args__ = (Index("ix_auth_password_resets_user_id", "user_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(36))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class LoginAttempt(Base):
    __tablename__ = "auth_login_attempts"
    __table_args__ = (
        Index("ix_auth_login_attempts_email_at", "email", "at"),
        Index("ix_auth_login_attempts_client_address_at", "client_address", "at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    email: Mapped[str] = mapped_column(String(254))
    client_address: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    succeeded: Mapped[bool] = mapped_column(Boolean)


audit = audit_table("auth_audit", Base.metadata)
# Its outbox, processed events and dead letters (migration 0004).
events = event_tables("auth", Base.metadata)


# --- credentials -------------------------------------------------------------------------


async def credentials_by_email(session: AsyncSession, email: str) -> Credentials | None:
    found: Credentials | None = await session.scalar(
        select(Credentials).where(Credentials.email == email)
    )
    return found


async def credentials_by_user(session: AsyncSession, user_id: str) -> Credentials | None:
    return await session.get(Credentials, user_id)


async def add_pending_credentials(
    session: AsyncSession, user_id: str, email: str, password_hash: str
) -> None:
    now = utcnow()
    session.add(
        Credentials(
            user_id=user_id,
            email=email,
            password_hash=password_hash,
            status=PENDING,
            created_at=now,
            updated_at=now,
        )
    )
    await session.flush()


async def take_over_pending(session: AsyncSession, user_id: str, password_hash: str) -> bool:
    """Gives a pending registration a new password hash; False when it is no longer pending."""
    result = await session.execute(
        update(Credentials)
        .where(Credentials.user_id == user_id, Credentials.status == PENDING)
        .values(password_hash=password_hash, updated_at=utcnow())
    )
    return _rowcount(result) == 1


async def activate(session: AsyncSession, user_id: str, password_hash: str) -> bool:
    """Marks a pending registration active, only if it still carries ``password_hash``
    (a concurrent Register that took it over wins, and this one fails)."""
    result = await session.execute(
        update(Credentials)
        .where(
            Credentials.user_id == user_id,
            Credentials.status == PENDING,
            Credentials.password_hash == password_hash,
        )
        .values(status=ACTIVE, updated_at=utcnow())
    )
    return _rowcount(result) == 1


async def delete_pending(session: AsyncSession, user_id: str, password_hash: str) -> None:
    await session.execute(
        delete(Credentials).where(
            Credentials.user_id == user_id,
            Credentials.status == PENDING,
            Credentials.password_hash == password_hash,
        )
    )


async def set_password_hash(
    session: AsyncSession, user_id: str, password_hash: str, *, replacing: str | None = None
) -> bool:
    """Stores a new hash; with ``replacing``, only if the stored hash is still that one."""
    condition = [Credentials.user_id == user_id]
    if replacing is not None:
        condition.append(Credentials.password_hash == replacing)
    result = await session.execute(
        update(Credentials)
        .where(*condition)
        .values(password_hash=password_hash, updated_at=utcnow())
    )
    return _rowcount(result) == 1


async def count_credentials(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(Credentials)) or 0)


# --- sessions and refresh tokens ----------------------------------------------------------


async def add_session(
    session: AsyncSession,
    user_id: str,
    *,
    ttl_seconds: int,
    client_address: str,
    user_agent: str,
) -> Session:
    now = utcnow()
    row = Session(
        id=new_id(),
        user_id=user_id,
        created_at=now,
        last_used_at=now,
        # The family's absolute end: rotated refresh tokens never outlive it.
        expires_at=now + timedelta(seconds=ttl_seconds),
        revoked_at=None,
        revoke_reason="",
        client_address=client_address[:64],
        user_agent=user_agent[:256],
    )
    session.add(row)
    await session.flush()
    return row


async def add_refresh_token(
    session: AsyncSession, session_id: str, token_hash: str, expires_at: datetime
) -> None:
    session.add(
        RefreshToken(
            id=new_id(),
            session_id=session_id,
            token_hash=token_hash,
            created_at=utcnow(),
            expires_at=expires_at,
            spent_at=None,
        )
    )
    await session.flush()


@dataclass(frozen=True)
class TokenInSession:
    token_id: str
    spent_at: datetime | None
    expires_at: datetime
    session: Session


async def refresh_token_by_hash(session: AsyncSession, token_hash: str) -> TokenInSession | None:
    row = (
        await session.execute(
            select(RefreshToken, Session)
            .join(Session, Session.id == RefreshToken.session_id)
            .where(RefreshToken.token_hash == token_hash)
        )
    ).first()
    if row is None:
        return None
    token, owner = row
    return TokenInSession(token.id, token.spent_at, token.expires_at, owner)


async def spend_refresh_token(session: AsyncSession, token_id: str) -> bool:
    """Marks the token spent; False when another call spent it first."""
    result = await session.execute(
        update(RefreshToken)
        .where(RefreshToken.id == token_id, RefreshToken.spent_at.is_(None))
        .values(spent_at=utcnow())
    )
    return _rowcount(result) == 1


async def touch_session(session: AsyncSession, session_id: str) -> None:
    await session.execute(
        update(Session).where(Session.id == session_id).values(last_used_at=utcnow())
    )


async def session_by_id(session: AsyncSession, session_id: str) -> Session | None:
    return await session.get(Session, session_id)


async def revoke_sessions(
    session: AsyncSession, user_id: str, reason: str, *, session_ids: Sequence[str] | None = None
) -> dict[str, datetime]:
    """Revokes the user's live sessions (or those of ``session_ids``); returns when each
    revoked one last had an access token issued (its ``last_used_at``), by id."""
    condition = [Session.user_id == user_id, Session.revoked_at.is_(None)]
    if session_ids is not None:
        if not session_ids:
            return {}
        condition.append(Session.id.in_(list(session_ids)))
    found = (
        await session.execute(select(Session.id, Session.last_used_at).where(*condition))
    ).all()
    revoked = {session_id: last_used for session_id, last_used in found}
    if revoked:
        await session.execute(
            update(Session)
            .where(Session.id.in_(list(revoked)), Session.revoked_at.is_(None))
            .values(revoked_at=utcnow(), revoke_reason=reason)
        )
    return revoked


async def live_sessions(session: AsyncSession, user_id: str) -> list[Session]:
    now = utcnow()
    rows = await session.scalars(
        select(Session)
        .where(Session.user_id == user_id, Session.revoked_at.is_(None), Session.expires_at > now)
        .order_by(Session.created_at.desc(), Session.id)
    )
    return list(rows.all())


async def forget_user(session: AsyncSession, user_id: str) -> list[datetime]:
    """Deletes the user's credentials, sessions and their refresh tokens, MFA secret,
    recovery codes and reset tokens (the audit trail stays); returns when each deleted
    session last had an access token issued."""
    sessions = select(Session.id).where(Session.user_id == user_id)
    issued = list(
        (
            await session.scalars(select(Session.last_used_at).where(Session.user_id == user_id))
        ).all()
    )
    await session.execute(delete(RefreshToken).where(RefreshToken.session_id.in_(sessions)))
    for table in (Session, Mfa, RecoveryCode, PasswordReset, Credentials):
        await session.execute(delete(table).where(table.user_id == user_id))
    return issued


# --- MFA ----------------------------------------------------------------------------------


async def mfa_of(session: AsyncSession, user_id: str) -> Mfa | None:
    return await session.get(Mfa, user_id)


async def put_pending_mfa(
    session: AsyncSession, user_id: str, key_id: str, ciphertext: bytes
) -> None:
    """Replaces any not-yet-confirmed enrolment with a new secret."""
    await session.execute(delete(Mfa).where(Mfa.user_id == user_id, Mfa.enabled.is_(False)))
    now = utcnow()
    session.add(
        Mfa(
            user_id=user_id,
            key_id=key_id,
            ciphertext=ciphertext,
            enabled=False,
            last_step=None,
            created_at=now,
            updated_at=now,
        )
    )
    await session.flush()


async def claim_step(
    session: AsyncSession, user_id: str, step: int, *, enable: bool = False
) -> bool:
    """Records ``step`` as used, only if it is later than the last one (so two calls with
    the same code cannot both succeed); optionally turns MFA on at the same time."""
    values: dict[str, Any] = {"last_step": step, "updated_at": utcnow()}
    if enable:
        values["enabled"] = True
    result = await session.execute(
        update(Mfa)
        .where(Mfa.user_id == user_id, or_(Mfa.last_step.is_(None), Mfa.last_step < step))
        .values(**values)
    )
    return _rowcount(result) == 1


async def reseal_mfa(session: AsyncSession, user_id: str, key_id: str, ciphertext: bytes) -> None:
    """Stores the secret re-encrypted under another key (key rotation)."""
    await session.execute(
        update(Mfa)
        .where(Mfa.user_id == user_id)
        .values(key_id=key_id, ciphertext=ciphertext, updated_at=utcnow())
    )


async def delete_mfa(session: AsyncSession, user_id: str) -> bool:
    """Removes the user's MFA (enrolled or pending) and recovery codes; True if there was
    an enabled one."""
    enabled = await session.scalar(select(Mfa.enabled).where(Mfa.user_id == user_id))
    await session.execute(delete(Mfa).where(Mfa.user_id == user_id))
    await session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user_id))
    return bool(enabled)


async def replace_recovery_codes(
    session: AsyncSession, user_id: str, key_id: str, code_hashes: Sequence[str]
) -> None:
    """The user's recovery codes become these (any earlier ones stop working)."""
    await session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user_id))
    now = utcnow()
    session.add_all(
        RecoveryCode(
            id=new_id(),
            user_id=user_id,
            key_id=key_id,
            code_hash=code_hash,
            created_at=now,
            used_at=None,
        )
        for code_hash in code_hashes
    )
    await session.flush()


async def use_recovery_code(
    session: AsyncSession, user_id: str, code_hashes: Sequence[str]
) -> bool:
    """Spends the user's unused code with one of these digests; False when none (or when a
    concurrent call spent it first)."""
    found = await session.scalar(
        select(RecoveryCode.id).where(
            RecoveryCode.user_id == user_id,
            RecoveryCode.code_hash.in_(list(code_hashes)),
            RecoveryCode.used_at.is_(None),
        )
    )
    if found is None:
        return False
    result = await session.execute(
        update(RecoveryCode)
        .where(RecoveryCode.id == found, RecoveryCode.used_at.is_(None))
        .values(used_at=utcnow())
    )
    return _rowcount(result) == 1


async def count_unused_recovery_codes(session: AsyncSession, user_id: str) -> int:
    found = await session.scalar(
        select(func.count())
        .select_from(RecoveryCode)
        .where(RecoveryCode.user_id == user_id, RecoveryCode.used_at.is_(None))
    )
    return int(found or 0)


# --- password resets ----------------------------------------------------------------------


async def count_resets_since(session: AsyncSession, user_id: str, since: datetime) -> int:
    found = await session.scalar(
        select(func.count())
        .select_from(PasswordReset)
        .where(PasswordReset.user_id == user_id, PasswordReset.created_at > since)
    )
    return int(found or 0)


async def add_reset(
    session: AsyncSession, user_id: str, token_hash: str, expires_at: datetime
) -> None:
    session.add(
        PasswordReset(
            id=new_id(),
            user_id=user_id,
            token_hash=token_hash,
            created_at=utcnow(),
            expires_at=expires_at,
            used_at=None,
        )
    )
    await session.flush()


async def reset_by_hash(session: AsyncSession, token_hash: str) -> PasswordReset | None:
    """The reset with this token digest, used or expired as it may be."""
    found: PasswordReset | None = await session.scalar(
        select(PasswordReset).where(PasswordReset.token_hash == token_hash)
    )
    return found


async def use_reset(session: AsyncSession, reset_id: str) -> bool:
    """Spends the reset token; False when another call spent it first."""
    result = await session.execute(
        update(PasswordReset)
        .where(PasswordReset.id == reset_id, PasswordReset.used_at.is_(None))
        .values(used_at=utcnow())
    )
    return _rowcount(result) == 1


async def retire_resets(session: AsyncSession, user_id: str) -> None:
    """Spends every other outstanding reset token of the user (after a reset)."""
    await session.execute(
        update(PasswordReset)
        .where(PasswordReset.user_id == user_id, PasswordReset.used_at.is_(None))
        .values(used_at=utcnow())
    )


# --- login attempts -----------------------------------------------------------------------


async def add_attempt(
    session: AsyncSession,
    email: str,
    client_address: str,
    *,
    succeeded: bool,
    prune_before: datetime,
) -> str:
    """Records one login attempt and drops this email's and address's attempts that have
    left the throttling window (the audit table keeps the history); returns its id."""
    await session.execute(
        delete(LoginAttempt).where(
            LoginAttempt.at < prune_before,
            or_(LoginAttempt.email == email, LoginAttempt.client_address == client_address),
        )
    )
    attempt_id = new_id()
    session.add(
        LoginAttempt(
            id=attempt_id,
            email=email,
            client_address=client_address[:64],
            at=utcnow(),
            succeeded=succeeded,
        )
    )
    await session.flush()
    return attempt_id


async def mark_attempt_succeeded(session: AsyncSession, attempt_id: str) -> None:
    """Turns a reserved attempt (counted as a failure until now) into a success."""
    await session.execute(
        update(LoginAttempt).where(LoginAttempt.id == attempt_id).values(succeeded=True)
    )


async def delete_attempt(session: AsyncSession, attempt_id: str) -> None:
    """Gives a reserved attempt back: it was not a wrong guess."""
    await session.execute(delete(LoginAttempt).where(LoginAttempt.id == attempt_id))


async def email_failures_since(
    session: AsyncSession, email: str, since: datetime
) -> list[datetime]:
    """Times of failed logins for ``email`` after ``since`` and after its last success,
    oldest first."""
    last_success = (
        select(func.max(LoginAttempt.at))
        .where(LoginAttempt.email == email, LoginAttempt.succeeded.is_(True))
        .scalar_subquery()
    )
    rows = await session.scalars(
        select(LoginAttempt.at)
        .where(
            LoginAttempt.email == email,
            LoginAttempt.succeeded.is_(False),
            LoginAttempt.at > since,
            or_(last_success.is_(None), LoginAttempt.at > last_success),
        )
        .order_by(LoginAttempt.at)
    )
    return list(rows.all())


async def address_failures_since(
    session: AsyncSession, client_address: str, since: datetime
) -> list[datetime]:
    """Times of failed logins from ``client_address`` after ``since``, oldest first."""
    rows = await session.scalars(
        select(LoginAttempt.at)
        .where(
            and_(
                LoginAttempt.client_address == client_address,
                LoginAttempt.succeeded.is_(False),
                LoginAttempt.at > since,
            )
        )
        .order_by(LoginAttempt.at)
    )
    return list(rows.all())


def _rowcount(result: Any) -> int:
    return result.rowcount if isinstance(result, CursorResult) else 0
