"""The file service's tables and queries (SQLAlchemy 2; SQLite and PostgreSQL).

``file_files`` holds one row per stored file (its bytes live in the storage, under
``storage_key``); ``file_upload_log`` one row per completed upload, kept an hour, which the
hourly upload limits count (deleting a file does not give its upload back); the audit
trail and the event tables. Only this module writes SQL; the rules are in ``uploads.py``
and ``library.py``.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, Index, String, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from learnmesh.audit import audit_table
from learnmesh.db import UtcDateTime
from learnmesh.eventing.tables import event_tables


class Base(DeclarativeBase):
    """The file service's own metadata: its migrations see only its tables."""


class FileRow(Base):
    __tablename__ = "file_files"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(36), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(127))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(32))  # "avatar", "course_material", "attachment"
    storage_key: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class UploadLogRow(Base):
    __tablename__ = "file_upload_log"
    __table_args__ = (Index("ix_file_upload_log_owner_at", "owner_id", "purpose", "at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(36))
    purpose: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(UtcDateTime)


file_audit = audit_table("file_audit", Base.metadata)
events = event_tables("file", Base.metadata)


async def get(session: AsyncSession, file_id: str) -> FileRow | None:
    row: FileRow | None = (
        await session.execute(select(FileRow).where(FileRow.id == file_id))
    ).scalar_one_or_none()
    return row


async def owner_of(session: AsyncSession, file_id: str) -> str | None:
    found: str | None = (
        await session.execute(select(FileRow.owner_id).where(FileRow.id == file_id))
    ).scalar_one_or_none()
    return found


async def stored_bytes(session: AsyncSession, owner_id: str) -> int:
    total = await session.scalar(
        select(func.coalesce(func.sum(FileRow.size), 0)).where(FileRow.owner_id == owner_id)
    )
    return int(total or 0)


async def uploads_since(
    session: AsyncSession, owner_id: str, purposes: tuple[str, ...], since: datetime
) -> list[datetime]:
    """When the owner's completed uploads of ``purposes`` after ``since`` were, oldest first."""
    rows = await session.scalars(
        select(UploadLogRow.at)
        .where(
            UploadLogRow.owner_id == owner_id,
            UploadLogRow.purpose.in_(purposes),
            UploadLogRow.at > since,
        )
        .order_by(UploadLogRow.at)
    )
    return list(rows.all())


async def add(session: AsyncSession, row: FileRow, *, prune_before: datetime) -> None:
    """Adds the file and its upload to the log (dropping the owner's log rows that no
    limit counts any more)."""
    session.add(row)
    session.add(
        UploadLogRow(
            id=str(uuid.uuid4()), owner_id=row.owner_id, purpose=row.purpose, at=row.created_at
        )
    )
    await session.execute(
        delete(UploadLogRow).where(
            UploadLogRow.owner_id == row.owner_id, UploadLogRow.at < prune_before
        )
    )
    await session.flush()


async def remove(session: AsyncSession, file_id: str) -> FileRow | None:
    """Deletes the row; the deleted row (its storage key), or None when there was none."""
    row = await get(session, file_id)
    if row is not None:
        await session.delete(row)
        await session.flush()
    return row


async def remove_owned_by(session: AsyncSession, owner_id: str) -> list[str]:
    """Deletes the owner's rows; their storage keys."""
    keys = list(
        (
            await session.execute(
                delete(FileRow).where(FileRow.owner_id == owner_id).returning(FileRow.storage_key)
            )
        ).scalars()
    )
    return keys


async def known_keys(session: AsyncSession, keys: list[str]) -> set[str]:
    """Which of ``keys`` belong to a file row."""
    if not keys:
        return set()
    rows = await session.scalars(select(FileRow.storage_key).where(FileRow.storage_key.in_(keys)))
    return set(rows.all())
