"""Uploads: a header, then the bytes, streamed to storage as they arrive, checked on the way.

Nothing is kept of an upload that does not succeed whole. The bytes go to the storage's
atomic ``put``: while they arrive, the SHA-256 is computed, the size is held to the
header's (refused as soon as one byte more arrives), and the first ``SNIFF_BYTES`` are
matched against the declared type before anything is written. Any refusal, a cancelled
call or a lost connection makes the put leave nothing. Only then is the file row written,
in a transaction serialised on the owner that checks the quotas again (two uploads racing
cannot both take the last slot); if that fails, the stored object is deleted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from learnmesh.config import FileSettings
from learnmesh.db import Database, utcnow
from learnmesh.eventing.outbox import emit
from learnmesh.events.v1 import events_pb2
from learnmesh.kernel.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from learnmesh.kernel.principal import Principal
from services.file import store
from services.file.sniff import ALLOWED, SNIFF_BYTES, normal_type, refusal, sniff
from services.file.storage import Storage

log = logging.getLogger("learnmesh.file.uploads")

HOUR = timedelta(hours=1)
PURPOSES = tuple(ALLOWED)


@dataclass(frozen=True)
class Header:
    filename: str
    content_type: str
    size: int
    sha256: str  # "" when the client sent none
    purpose: str


@dataclass(frozen=True)
class StoredFile:
    id: str
    owner_id: str
    filename: str
    content_type: str
    size: int
    sha256: str
    purpose: str
    created_at: datetime

    @classmethod
    def of(cls, row: store.FileRow) -> StoredFile:
        return cls(
            row.id,
            row.owner_id,
            row.filename,
            row.content_type,
            row.size,
            row.sha256,
            row.purpose,
            row.created_at,
        )


def storage_key(owner_id: str, file_id: str) -> str:
    return f"{owner_id}/{file_id}"


def max_bytes(settings: FileSettings, purpose: str) -> int:
    limit: int = getattr(settings, f"{purpose}_max_bytes")
    return limit


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):g} MiB"


class Uploads:
    def __init__(self, db: Database, storage: Storage, settings: FileSettings) -> None:
        self.db = db
        self.storage = storage
        self.settings = settings

    def check_header(self, header: Header) -> str:
        """The declared type, normalised; INVALID_ARGUMENT when the header cannot be taken."""
        limit = max_bytes(self.settings, header.purpose)
        if header.size > limit:
            raise InvalidArgument.field(
                "header.size",
                f"{header.purpose} files may be at most {limit} bytes ({_mib(limit)})",
            )
        declared = normal_type(header.content_type)
        if declared not in ALLOWED[header.purpose]:
            accepted = ", ".join(sorted(ALLOWED[header.purpose]))
            raise InvalidArgument.field(
                "header.content_type",
                f"{declared} is not accepted for {header.purpose}; accepted: {accepted}",
            )
        return declared

    def _hourly_limit(self, caller: Principal, purpose: str) -> tuple[int, tuple[str, ...]]:
        """The caller's uploads per hour for ``purpose`` and the purposes sharing them."""
        if purpose == "avatar":
            return self.settings.avatar_uploads_per_hour, ("avatar",)
        limit: int = getattr(self.settings, f"{caller.tier}_uploads_per_hour", 0)
        return limit, tuple(p for p in PURPOSES if p != "avatar")

    async def check_quotas(self, session: AsyncSession, caller: Principal, header: Header) -> None:
        """FAILED_PRECONDITION when the caller's tier allows no such upload or the storage
        quota has no room; RESOURCE_EXHAUSTED (with RetryInfo) when the hour's uploads
        are used up."""
        limit, shared = self._hourly_limit(caller, header.purpose)
        if limit <= 0:
            raise FailedPrecondition(
                f"the {caller.tier} tier includes no {header.purpose} uploads; a higher "
                "subscription tier does",
                reason="UPLOADS_NOT_IN_TIER",
            )
        now = utcnow()
        recent = await store.uploads_since(session, caller.user_id, shared, now - HOUR)
        if len(recent) >= limit:
            frees_at = recent[len(recent) - limit] + HOUR
            raise ResourceExhausted(
                f"{limit} {header.purpose if header.purpose == 'avatar' else 'file'} uploads "
                "per hour are used up",
                retry_after=max(math.ceil((frees_at - now).total_seconds()), 1),
                reason="UPLOAD_LIMIT",
            )
        used = await store.stored_bytes(session, caller.user_id)
        quota = self.settings.storage_quota_bytes
        if used + header.size > quota:
            raise FailedPrecondition(
                f"this upload would take your stored files to {used + header.size} bytes; "
                f"the quota is {quota} bytes ({_mib(quota)}): delete files to make room",
                reason="STORAGE_QUOTA",
            )

    async def upload(
        self, caller: Principal, header: Header, chunks: AsyncIterator[bytes]
    ) -> StoredFile:
        declared = self.check_header(header)
        async with self.db.transaction() as session:
            await self.check_quotas(session, caller, header)  # early: before any byte
        file_id = str(uuid.uuid4())
        key = storage_key(caller.user_id, file_id)
        digest = await self._store(key, header, declared, chunks)
        try:
            async with self.db.serialised(f"file.quota:{caller.user_id}") as session:
                await self.check_quotas(session, caller, header)  # again, alone
                row = store.FileRow(
                    id=file_id,
                    owner_id=caller.user_id,
                    filename=header.filename,
                    content_type=declared,
                    size=header.size,
                    sha256=digest,
                    purpose=header.purpose,
                    storage_key=key,
                    created_at=utcnow(),
                )
                await store.add(session, row, prune_before=row.created_at - HOUR)
                uploaded = events_pb2.FileUploaded(
                    file_id=file_id,
                    owner_id=caller.user_id,
                    content_type=declared,
                    size=header.size,
                )
                await emit(session, store.events.outbox, "file.uploaded", file_id, uploaded)
        except BaseException:
            # No row: the object must go too (shielded: a cancelled call still removes it).
            await asyncio.shield(self._discard(key))
            raise
        return StoredFile.of(row)

    async def _discard(self, key: str) -> None:
        try:
            await self.storage.delete(key)
        except Exception:  # the orphan sweep removes it later
            log.exception("could not delete the object of a failed upload (%s)", key)

    async def _store(
        self, key: str, header: Header, declared: str, chunks: AsyncIterator[bytes]
    ) -> str:
        """Streams the checked bytes to storage; the SHA-256 (hex) once all are stored."""
        hasher = hashlib.sha256()

        async def checked() -> AsyncIterator[bytes]:
            received = 0
            head: bytearray | None = bytearray()
            async for chunk in chunks:
                received += len(chunk)
                if received > header.size:
                    raise InvalidArgument.field(
                        "header.size",
                        f"the upload sent more than the {header.size} bytes it declared",
                    )
                hasher.update(chunk)
                if head is None:
                    yield chunk
                    continue
                head += chunk
                if len(head) >= SNIFF_BYTES:
                    self._check_type(bytes(head[:SNIFF_BYTES]), declared, header.purpose)
                    yield bytes(head)
                    head = None
            if received != header.size:
                raise InvalidArgument.field(
                    "header.size",
                    f"the upload declared {header.size} bytes and sent {received}",
                )
            if header.sha256 and hasher.hexdigest() != header.sha256:
                raise InvalidArgument.field(
                    "header.sha256", "the bytes received do not have this SHA-256"
                )
            if head is not None:
                self._check_type(bytes(head), declared, header.purpose)
                yield bytes(head)

        await self.storage.put(key, checked())
        return hasher.hexdigest()

    @staticmethod
    def _check_type(head: bytes, declared: str, purpose: str) -> None:
        why = refusal(declared, purpose, sniff(head))
        if why is not None:
            raise InvalidArgument.field("header.content_type", why)
