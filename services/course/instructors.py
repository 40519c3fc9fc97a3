"""Instructors' display names, from the user service, with a fallback when it is down.

A page of courses asks ``UserService.BatchGetUsers`` once for the instructors it needs
(never once per course), through the client chain (deadline, circuit breaker, retries of
this idempotent read). A name the user service gave is used again without asking for
``course.instructor_ttl`` seconds, as long as the channel to the user service is connected
and no ``user.updated`` event marked it due (``refresh_due``, seen by every replica). Each
name it gives is also stored (``course_instructors``), so that when it cannot be reached,
reads still answer with the last known name and ``stale`` set: the reference design's
get-with-fallback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
from grpc import aio
from sqlalchemy.exc import SQLAlchemyError

from learnmesh.client import ClientFactory
from learnmesh.config import CourseSettings
from learnmesh.db import Database, utcnow
from learnmesh.user.v1 import user_pb2
from services.course import store

log = logging.getLogger("learnmesh.course.instructors")

# Names kept in memory at most; beyond it the oldest half is dropped (they are asked again).
MEMORY_LIMIT = 50_000
BATCH_LIMIT = 100  # BatchGetUsers' max_items


@dataclass(frozen=True)
class Instructor:
    id: str
    display_name: str
    # True when the user service could not be asked: the name is the last one known.
    stale: bool = False


@dataclass(frozen=True)
class Wanted:
    """An instructor a page shows, with what the database last knew of them."""

    id: str
    last_name: str | None  # None: never known
    refresh_due: bool = False


class Instructors:
    def __init__(
        self,
        db: Database,
        clients: ClientFactory,
        settings: CourseSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.clients = clients
        self.settings = settings
        self.clock = clock
        # id -> (name, when the user service gave it), this process's recent answers.
        self._recent: dict[str, tuple[str, float]] = {}
        # One BatchGetUsers in flight per instructor: concurrent reads wait for it.
        self._asking: dict[str, asyncio.Future[dict[str, Instructor]]] = {}

    def forget(self, user_id: str) -> None:
        """Asks the user service again next time (this process; others see refresh_due)."""
        self._recent.pop(user_id, None)

    def connected(self) -> bool:
        """Whether the channel to the user service is up (no call made to find out)."""
        state = self.clients.channel("user").get_state(try_to_connect=False)
        return state == grpc.ChannelConnectivity.READY

    async def resolve(self, wanted: Iterable[Wanted]) -> dict[str, Instructor]:
        """The instructors by id, fresh where the user service answers, stale otherwise."""
        by_id = {w.id: w for w in wanted}
        found: dict[str, Instructor] = {}
        due: list[Wanted] = []
        now = self.clock()
        connected = self.connected() if by_id else False
        for w in by_id.values():
            recent = self._recent.get(w.id)
            if (
                recent is not None
                and connected
                and not w.refresh_due
                and now - recent[1] < self.settings.instructor_ttl
            ):
                found[w.id] = Instructor(w.id, recent[0])
            else:
                due.append(w)
        waiting = [self._asking[w.id] for w in due if w.id in self._asking]
        mine = [w for w in due if w.id not in self._asking]
        for start in range(0, len(mine), BATCH_LIMIT):
            batch = mine[start : start + BATCH_LIMIT]
            future: asyncio.Future[dict[str, Instructor]] = (
                asyncio.get_running_loop().create_future()
            )
            for w in batch:
                self._asking[w.id] = future
            waiting.append(future)
            try:
                answer = await self._ask(batch)
                if not future.done():
                    future.set_result(answer)
            except BaseException:
                # Cancelled (or failed) here: whoever waits for these answers stale.
                if not future.done():
                    future.set_result(
                        {w.id: Instructor(w.id, w.last_name or "", stale=True) for w in batch}
                    )
                raise
            finally:
                for w in batch:
                    if self._asking.get(w.id) is future:
                        del self._asking[w.id]
        # Shielded: a call cancelled while it waits must not cancel another call's question.
        for answered in await asyncio.gather(*(asyncio.shield(f) for f in waiting)):
            found.update({k: v for k, v in answered.items() if k in by_id})
        for w in due:  # asked by a call that did not want them all: theirs, stale or not
            found.setdefault(w.id, Instructor(w.id, w.last_name or "", stale=True))
        return found

    async def _ask(self, batch: list[Wanted]) -> dict[str, Instructor]:
        """One BatchGetUsers for ``batch``; the last known names, stale, if it fails."""
        try:
            response = await self.clients.stub("user").BatchGetUsers(
                user_pb2.BatchGetUsersRequest(user_ids=[w.id for w in batch]),
                timeout=self.settings.user_timeout,
            )
        except aio.AioRpcError as exc:
            log.warning(
                "the user service did not answer BatchGetUsers (%s): answering with the "
                "last known instructor names",
                exc.code().name,
            )
            return {w.id: Instructor(w.id, w.last_name or "", stale=True) for w in batch}
        given = {u.id: u.display_name for u in response.users}
        now = self.clock()
        if len(self._recent) > MEMORY_LIMIT:
            for key in list(self._recent)[: MEMORY_LIMIT // 2]:
                del self._recent[key]
        answer: dict[str, Instructor] = {}
        changed: dict[str, str] = {}
        for w in batch:
            # A user the service no longer has (deleted) keeps the last name known.
            name = given.get(w.id, w.last_name or "")
            self._recent[w.id] = (name, now)
            answer[w.id] = Instructor(w.id, name)
            if w.id in given and (name != w.last_name or w.refresh_due):
                changed[w.id] = name
        if changed:
            await self._store(changed)
        return answer

    async def _store(self, names: dict[str, str]) -> None:
        """Keeps the names for the fallback; a read does not fail when it cannot."""
        try:
            async with self.db.write_transaction() as session:
                await store.remember_instructors(session, names, utcnow())
        except SQLAlchemyError as exc:
            log.warning("could not store instructor names (%s); next read asks again", exc)
            for user_id in names:
                self.forget(user_id)
