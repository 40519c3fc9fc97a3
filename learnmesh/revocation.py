"""The revocation feed: every process hears every revocation and fills its RevocationList.

Access tokens are verified locally, so a logout or a demotion reaches other servers only as
an event. Each process takes a broadcast of ``session.revoked``, ``user.updated`` (a role
change) and ``user.deleted`` (not a consumer group: every replica needs all of them),
starting one access-token lifetime ago, so a process that starts, or reconnects, learns the
revocations still in force; ``start_revocation_feed`` returns only once that replay is
applied, before the server reports SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from learnmesh.eventing.bus import Broadcast, Bus, BusUnavailable
from learnmesh.events.v1 import events_pb2
from learnmesh.kernel.revocations import RevocationList
from learnmesh.kernel.tokens import LEEWAY

log = logging.getLogger("learnmesh.revocation")

SESSION_REVOKED = "session.revoked"
USER_UPDATED = "user.updated"
USER_DELETED = "user.deleted"
EVENT_TYPES = (SESSION_REVOKED, USER_UPDATED, USER_DELETED)
M = TypeVar("M", bound=Message)


def apply(event: events_pb2.Event, revocations: RevocationList, access_token_ttl: float) -> bool:
    """Puts what ``event`` revokes into ``revocations``; whether it revoked anything."""
    at = event.time.ToMicroseconds() / 1e6 if event.HasField("time") else time.time()
    if event.type == SESSION_REVOKED:
        revoked = _unpacked(event, events_pb2.SessionRevoked())
        if revoked is None:
            return False
        if revoked.HasField("expires_at"):
            until = revoked.expires_at.ToMicroseconds() / 1e6
        else:
            until = at + access_token_ttl
        if revoked.all_sessions:
            revocations.revoke_user_before(revoked.user_id, at, until)
        revocations.revoke_sessions(revoked.session_ids, until)
        return bool(revoked.all_sessions or revoked.session_ids)
    if event.type == USER_UPDATED:
        updated = _unpacked(event, events_pb2.UserUpdated())
        if updated is None or "role" not in updated.changed_fields:
            return False
        revocations.revoke_user_before(updated.user_id, at, at + access_token_ttl)
        return True
    if event.type == USER_DELETED:
        deleted = _unpacked(event, events_pb2.UserDeleted())
        if deleted is None:
            return False
        revocations.revoke_user_before(deleted.user_id, at, at + access_token_ttl)
        return True
    return False


def _unpacked(event: events_pb2.Event, into: M) -> M | None:
    if not event.data.Unpack(into):
        log.warning("event %s: %s does not carry %s", event.id, event.type, into.DESCRIPTOR.name)
        return None
    return into


def _decoded(data: bytes) -> events_pb2.Event | None:
    try:
        return events_pb2.Event.FromString(data)
    except DecodeError:
        log.warning("revocation feed: a message that is not an Event was skipped")
        return None


class RevocationFeed:
    """The running feed (``start_revocation_feed``); ``aclose`` stops it."""

    def __init__(
        self,
        broadcast: Broadcast,
        revocations: RevocationList,
        access_token_ttl: float,
        *,
        prune_interval: float,
    ) -> None:
        self.broadcast = broadcast
        self.revocations = revocations
        self.access_token_ttl = access_token_ttl
        self.prune_interval = prune_interval
        self.applied = 0
        self._task: asyncio.Task[None] | None = None

    def _take(self, data: bytes) -> None:
        event = _decoded(data)
        if event is not None and apply(event, self.revocations, self.access_token_ttl):
            self.applied += 1

    async def catch_up(self, within: float) -> None:
        """Applies what the bus replays (published before the feed began)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self.broadcast.replaying:
            left = deadline - loop.time()
            data = await self.broadcast.next(wait=left) if left > 0 else None
            if data is None and self.broadcast.replaying:
                raise BusUnavailable(
                    f"the revocation feed did not catch up within {within} s: "
                    "this process cannot know which tokens are revoked"
                )
            if data is not None:
                self._take(data)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="revocation-feed")

    async def _run(self) -> None:
        pruned_at = time.monotonic()
        while True:
            try:
                data = await self.broadcast.next(wait=self.prune_interval)
            except BusUnavailable as exc:
                log.warning("revocation feed: %s", exc)  # the bus client reconnects
                await asyncio.sleep(1.0)
                continue
            if data is not None:
                self._take(data)
            if time.monotonic() - pruned_at >= self.prune_interval:
                self.revocations.prune()
                pruned_at = time.monotonic()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.broadcast.close()


async def start_revocation_feed(
    bus: Bus,
    revocations: RevocationList,
    access_token_ttl: float,
    *,
    catch_up_timeout: float = 10.0,
    prune_interval: float = 30.0,
) -> RevocationFeed:
    """Subscribes to every revocation of the last ``access_token_ttl`` seconds and on,
    applies those already published, and keeps applying new ones until ``aclose``.
    Raises BusUnavailable when the bus (started: the process's, which the server starts
    with its events) cannot replay them within ``catch_up_timeout``."""
    since = time.time() - access_token_ttl - LEEWAY
    broadcast = await bus.broadcast(EVENT_TYPES, since)
    feed = RevocationFeed(broadcast, revocations, access_token_ttl, prune_interval=prune_interval)
    try:
        await feed.catch_up(catch_up_timeout)
    except BaseException:
        await broadcast.close()
        raise
    if feed.applied:
        log.info("revocation feed: %d revocations still in force", feed.applied)
    feed.start()
    return feed
