"""The user service's tables and queries (SQLAlchemy 2; the same SQL on SQLite and PostgreSQL).

Profiles live in ``user_profiles``; security events (role changes, deletions) in the
append-only ``user_audit``. Only this module writes SQL; the rules are in ``profiles.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Index, String, Text, and_, delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from learnmesh.audit import audit_table
from learnmesh.db import UtcDateTime
from learnmesh.eventing.tables import event_tables
from learnmesh.shared_secrets import secrets_table


class Base(DeclarativeBase):
    """The user service's own metadata: its migrations see only its tables."""


class ProfileRow(Base):
    __tablename__ = "user_profiles"
    __table_args__ = (
        # Newest-first keyset pagination walks this index.
        Index("ix_user_profiles_created_at_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # Stored lower-case, so uniqueness is case-insensitive.
    email: Mapped[str] = mapped_column(String(254), unique=True)
    display_name: Mapped[str] = mapped_column(String(50))
    avatar_url: Mapped[str] = mapped_column(String(512), default="")
    bio: Mapped[str] = mapped_column(Text, default="")
    # Role and tier by lower-case name ("admin", "free_user"; "free", "pro").
    role: Mapped[str] = mapped_column(String(32), index=True)
    tier: Mapped[str] = mapped_column(String(32))
    # JSON: {"theme": …, "language": …, "notification_channels": […]}.
    preferences: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


user_audit = audit_table("user_audit", Base.metadata)
# Its outbox, processed events and dead letters (migration 0003).
events = event_tables("user", Base.metadata)
# Keys every replica shares (migration 0004): the page-token key.
user_secrets = secrets_table("user_secrets", Base.metadata)


async def get(
    session: AsyncSession, user_id: str, *, for_update: bool = False
) -> ProfileRow | None:
    query = select(ProfileRow).where(ProfileRow.id == user_id)
    if for_update:
        query = query.with_for_update()
    row: ProfileRow | None = (await session.execute(query)).scalar_one_or_none()
    return row


async def by_email(
    session: AsyncSession, email: str, *, for_update: bool = False
) -> ProfileRow | None:
    query = select(ProfileRow).where(ProfileRow.email == email)
    if for_update:
        query = query.with_for_update()
    row: ProfileRow | None = (await session.execute(query)).scalar_one_or_none()
    return row


async def add(session: AsyncSession, row: ProfileRow) -> None:
    """Inserts ``row`` now, so a duplicate id or email fails here (IntegrityError)."""
    session.add(row)
    await session.flush()


async def many(session: AsyncSession, user_ids: Sequence[str]) -> list[ProfileRow]:
    """The profiles among ``user_ids`` that exist, in no particular order."""
    if not user_ids:
        return []
    query = select(ProfileRow).where(ProfileRow.id.in_(list(user_ids)))
    return list((await session.execute(query)).scalars())


async def page(
    session: AsyncSession,
    *,
    limit: int,
    after: tuple[datetime, str] | None = None,
    role: str = "",
    text: str = "",
) -> list[ProfileRow]:
    """Up to ``limit`` profiles, newest first, strictly after the (created_at, id) cursor.

    A keyset query (no OFFSET): rows inserted meanwhile neither shift nor repeat a page.
    ``text`` matches email or display name as a case-insensitive substring, with LIKE
    wildcards in it taken literally.
    """
    query = select(ProfileRow)
    if after is not None:
        created_at, last_id = after
        query = query.where(
            or_(
                ProfileRow.created_at < created_at,
                and_(ProfileRow.created_at == created_at, ProfileRow.id < last_id),
            )
        )
    if role:
        query = query.where(ProfileRow.role == role)
    if text:
        needle = text.lower()
        query = query.where(
            or_(
                ProfileRow.email.contains(needle, autoescape=True),
                func.lower(ProfileRow.display_name).contains(needle, autoescape=True),
            )
        )
    query = query.order_by(ProfileRow.created_at.desc(), ProfileRow.id.desc()).limit(limit)
    return list((await session.execute(query)).scalars())


async def lock_ids_with_role(session: AsyncSession, role: str) -> list[str]:
    """Ids of the users holding ``role``, locked on PostgreSQL until the transaction ends,
    so two admins demoting each other at once cannot both see the other as a spare."""
    query = (
        select(ProfileRow.id)
        .where(ProfileRow.role == role)
        .order_by(ProfileRow.id)  # one lock order for every caller: no deadlocks
        .with_for_update()
    )
    return list((await session.execute(query)).scalars())


async def remove(session: AsyncSession, user_id: str) -> bool:
    """Deletes the profile; False when there was none."""
    result = await session.execute(delete(ProfileRow).where(ProfileRow.id == user_id))
    return bool(getattr(result, "rowcount", 0))
