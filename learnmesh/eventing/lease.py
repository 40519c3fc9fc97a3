"""Which member of a consumer group is the active one, when the bus does not order a
subject's events across members (JetStream hands the next message to whoever fetches, so
two members could apply two events of one subject at once, in either order).

On PostgreSQL a member is active while it holds a session advisory lock on a connection of
its own; the others try again every ``retry`` seconds, so one takes over soon after the
active member dies (its lock goes with its connection). In one process (SQLite), the
members share an asyncio lock. Members of one group in several processes on one SQLite
file are not coordinated: run one consumer process per SQLite database.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from learnmesh.db import Database

_local: dict[str, asyncio.Lock] = {}


def _setter(event: asyncio.Event) -> Callable[..., None]:
    return lambda *_args: event.set()


@asynccontextmanager
async def active_member(
    db: Database, group: str, *, retry: float = 1.0
) -> AsyncIterator[asyncio.Event]:
    """Waits until this member is the group's active one; yields an event set when it
    stops being it (its lock connection was lost)."""
    key = f"learnmesh.consumer:{group}"
    if not db.is_postgres:
        lock = _local.setdefault(f"{db.url}|{key}", asyncio.Lock())
        async with lock:
            yield asyncio.Event()
        return
    dsn = db.url.set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await _locked_connection(dsn, key, retry)
    lost = asyncio.Event()
    conn.add_termination_listener(_setter(lost))
    watch = asyncio.create_task(_watch(conn, lost, retry))
    try:
        yield lost
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        with contextlib.suppress(Exception):
            await conn.close(timeout=2)


async def _locked_connection(dsn: str, key: str, retry: float) -> Any:
    while True:
        conn = None
        try:
            conn = await asyncpg.connect(dsn, timeout=10)
            if await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
                return conn
        except (OSError, asyncpg.PostgresError, TimeoutError):
            pass
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)
        await asyncio.sleep(retry)


async def _watch(conn: Any, lost: asyncio.Event, every: float) -> None:
    """Checks the lock's connection now and then: a silent network loss shows here."""
    while not lost.is_set():
        await asyncio.sleep(max(every, 5.0))
        try:
            await conn.fetchval("SELECT 1", timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            lost.set()
