"""The orphan sweep: removes stored objects that no file row names.

Such objects are left by a crash between a delete's commit and the object's removal, by a
deleted user's files (their rows go in the event's transaction), or by an upload whose row
could not be written. An object is removed only when it was already an orphan at the
previous sweep, ``sweep_interval`` seconds earlier: an upload between its put and its
commit (milliseconds) is never taken for one. Leftovers of interrupted puts are removed at
start (``Storage.sweep_partial``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from learnmesh.db import Database
from services.file import store
from services.file.storage import Storage

log = logging.getLogger("learnmesh.file.sweep")
BATCH = 500


class Sweeper:
    def __init__(self, db: Database, storage: Storage, interval: float) -> None:
        self.db = db
        self.storage = storage
        self.interval = interval
        self._suspects: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def sweep(self) -> int:
        """One pass; returns how many objects it removed."""
        keys = await self.storage.keys()
        orphans: set[str] = set()
        for start in range(0, len(keys), BATCH):
            batch = keys[start : start + BATCH]
            async with self.db.transaction() as session:
                known = await store.known_keys(session, batch)
            orphans.update(k for k in batch if k not in known)
        removed = 0
        for key in sorted(orphans & self._suspects):
            if await self.storage.delete(key):
                removed += 1
        self._suspects = orphans - self._suspects
        if removed:
            log.info("removed %d stored objects that no file names", removed)
        return removed

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="file orphan sweep")

    async def _run(self) -> None:
        try:
            removed = await self.storage.sweep_partial()
            if removed:
                log.info("removed %d leftovers of interrupted uploads", removed)
        except Exception:
            log.exception("could not remove the leftovers of interrupted uploads")
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("the orphan sweep failed; it runs again in %ss", self.interval)
            await asyncio.sleep(self.interval)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
