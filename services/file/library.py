"""The stored files: reading them, deleting them, and forgetting a deleted user's.

A delete removes the row first (committed with its ``file.deleted`` event), then the
object: a crash in between leaves an object that no row names, which the orphan sweep
(``sweeper.py``) removes; never a row whose bytes are gone. Who may read or delete a file
(its owner or an admin) is decided before this runs, by the access link with the owner
resolver (``owner_of``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncSession

from learnmesh import audit
from learnmesh.config import FileSettings
from learnmesh.db import Database
from learnmesh.eventing.outbox import emit
from learnmesh.events.v1 import events_pb2
from learnmesh.kernel.errors import InvalidArgument, NotFound
from services.file import store
from services.file.storage import Storage, StorageNotFound
from services.file.uploads import StoredFile

log = logging.getLogger("learnmesh.file.library")


def _not_found(file_id: str) -> NotFound:
    return NotFound(f"no file {file_id}")


class Library:
    def __init__(self, db: Database, storage: Storage, settings: FileSettings) -> None:
        self.db = db
        self.storage = storage
        self.settings = settings

    async def owner_of(self, file_id: str) -> str:
        """The file's owner, for the access link's ACCESS_OWNER check (it runs before
        validation, so the id's shape is checked here)."""
        try:
            uuid.UUID(file_id)
        except ValueError:
            raise InvalidArgument.field("file_id", "must be a UUID") from None
        async with self.db.transaction() as session:
            owner = await store.owner_of(session, file_id)
        if owner is None:
            raise _not_found(file_id)
        return owner

    async def get(self, file_id: str) -> StoredFile:
        async with self.db.transaction() as session:
            row = await store.get(session, file_id)
        if row is None:
            raise _not_found(file_id)
        return StoredFile.of(row)

    async def download(self, file_id: str) -> tuple[StoredFile, AsyncIterator[bytes]]:
        """The file and its bytes, read from storage as the caller consumes them."""
        async with self.db.transaction() as session:
            row = await store.get(session, file_id)
        if row is None:
            raise _not_found(file_id)
        stored = StoredFile.of(row)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in self.storage.read(
                    row.storage_key, chunk_size=self.settings.download_chunk_bytes
                ):
                    yield chunk
            except StorageNotFound:
                # Deleted between the row's read and the object's (a concurrent delete).
                raise _not_found(file_id) from None

        return stored, chunks()

    async def delete(self, file_id: str, *, actor: str) -> None:
        async with self.db.transaction() as session:
            row = await store.remove(session, file_id)
            if row is None:
                raise _not_found(file_id)
            deleted = events_pb2.FileDeleted(file_id=file_id, owner_id=row.owner_id)
            await emit(session, store.events.outbox, "file.deleted", file_id, deleted)
            await audit.record(
                session, store.file_audit, "file.deleted", row.owner_id, actor=actor, file=file_id
            )
        try:
            await self.storage.delete(row.storage_key)
        except Exception:
            log.exception("could not delete %s after its row; the sweep will", row.storage_key)


async def forget_owner(session: AsyncSession, owner_id: str) -> int:
    """Deletes the rows of a deleted user's files (in the consumer's transaction); their
    objects, named by no row any more, go with the next sweep."""
    keys = await store.remove_owned_by(session, owner_id)
    await audit.record(session, store.file_audit, "user.forgotten", owner_id, files=len(keys))
    return len(keys)
