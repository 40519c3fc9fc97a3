"""The SQLAlchemy async engine shared by the services of one process, and their migrations.

SQLite (aiosqlite) under var/ by default, PostgreSQL (asyncpg) when the URL says so: the
same models and queries run on both. Each service owns its tables and its Alembic history
(``alembic_version_<service>``), so services migrate independently in one database.

A SQLite database holds password hashes and tokens, so its file is private to the user
running the mesh (mode 0600, like the keys): it is created with that mode before SQLite
first opens it, and an existing one (and its -wal/-shm files) is brought to it. SQLite
gives the -wal and -shm files it creates the database file's own mode, so they follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import DateTime, event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator


class Base(DeclarativeBase):
    """Declarative base of every service's models (each service uses its own tables)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on both backends (SQLite hands back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# How long a SQLite writer waits for the write lock before "database is locked".
SQLITE_BUSY_TIMEOUT = 5.0


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT * 1000)}")
    cursor.close()


log = logging.getLogger("learnmesh.db")

# A pooled PostgreSQL connection idle for longer is pinged before it is handed out.
PING_AFTER_IDLE = 1.0
_CHECKED_IN = "learnmesh.checked_in"


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info[_CHECKED_IN] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """Pessimistic disconnect handling for idle connections only: one that sat in the
    pool for PING_AFTER_IDLE (the database may have restarted meanwhile) is pinged, and a
    dead one is replaced before any query uses it. Under load connections come back within
    milliseconds, so the round trip SQLAlchemy's pool_pre_ping adds to every transaction
    is saved (it cost about a sixth of an event's emit transaction in benchmarks.events)."""
    checked_in = record.info.get(_CHECKED_IN)
    if checked_in is None or time.monotonic() - checked_in < PING_AFTER_IDLE:
        return
    try:
        dbapi_connection.ping()
    except Exception as exc:
        raise DisconnectionError(f"pooled connection is dead: {exc}") from exc


PRIVATE = 0o600
# Besides the database file itself: the write-ahead log, its index, a rollback journal.
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def make_private_sqlite(database: str) -> None:
    """Creates the SQLite file ``database`` with mode 0600 if it is missing, and gives it
    and any companion file that exists mode 0600 (whatever the umask)."""
    path = Path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_CREAT with 0600: the file never exists with a wider mode, even for an instant.
    # Only when missing: closing any descriptor of a file drops every POSIX lock this
    # process holds on it, so opening a database SQLite already has open would break
    # SQLite's locking (disk I/O errors in another connection of the process).
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, PRIVATE))
    for file in [path, *(path.with_name(path.name + s) for s in SQLITE_COMPANIONS)]:
        try:
            if file.stat().st_mode & 0o777 != PRIVATE:
                os.chmod(file, PRIVATE)
        except FileNotFoundError:
            continue
        except PermissionError:
            # Someone else's file (a mounted volume, say): not ours to change, but say so.
            log.warning("cannot make %s private (mode 0600): not its owner", file)


def _sqlite_file(url: Any) -> str | None:
    """The file of a SQLite URL; None for an in-memory database."""
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    if url.query.get("mode") == "memory":
        return None
    return str(database)


def lock_id(name: str) -> int:
    """A stable signed 64-bit number for ``name`` (a PostgreSQL advisory lock key)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big", signed=True)


class Database:
    """One engine and session factory per process."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = make_url(url)
        if self.url.get_backend_name() == "sqlite":
            database = _sqlite_file(self.url)
            if database is not None:
                make_private_sqlite(database)
        self.engine: AsyncEngine = create_async_engine(self.url, echo=echo)
        if self.is_postgres:
            event.listen(self.engine.sync_engine, "checkin", _note_checkin)
            event.listen(self.engine.sync_engine, "checkout", _ping_if_idle)
        else:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._writer_lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    @property
    def is_postgres(self) -> bool:
        return self.url.get_backend_name() == "postgresql"

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session in a transaction: committed on success, rolled back on any error."""
        async with self.sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def write_transaction(self) -> AsyncIterator[AsyncSession]:
        """A transaction that reads in order to decide a write (a check-then-act rule).

        On PostgreSQL the same as ``transaction()``: its queries lock what they read with
        ``with_for_update()``. SQLite ignores FOR UPDATE and its driver begins a transaction
        only at the first write, so two such transactions could both read the same rows and
        both write; here the transaction starts with BEGIN IMMEDIATE, which takes the
        database's write lock first, so they run one after the other (the second waits up
        to busy_timeout, then reads what the first committed).
        """
        if self.is_postgres:
            async with self.sessions() as session, session.begin():
                yield session
            return
        # The process's writers queue here, in order, rather than in SQLite's busy handler,
        # which sleeps up to 100 ms between tries while the lock may already be free (under
        # contention most waiters then ran out of busy_timeout with "database is locked").
        async with self._writer(), self.sessions() as session, session.begin():
            await session.execute(text("BEGIN IMMEDIATE"))
            yield session

    @asynccontextmanager
    async def serialised(self, *names: str) -> AsyncIterator[AsyncSession]:
        """A transaction that runs alone among those serialised on any of ``names`` (a
        count-then-insert rule: a throttle, a quota). PostgreSQL takes transaction-scoped
        advisory locks, in a fixed order so that two callers never wait on each other in a
        cycle; SQLite takes the database's one write lock first (``write_transaction``)."""
        if not self.is_postgres:
            async with self.write_transaction() as session:
                yield session
            return
        async with self.transaction() as session:
            for key in sorted({lock_id(name) for name in names}):
                await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
            yield session

    @asynccontextmanager
    async def _writer(self) -> AsyncIterator[None]:
        """This process's turn to write to the SQLite file (waits up to busy_timeout)."""
        loop = asyncio.get_running_loop()
        if self._writer_lock is None or self._writer_lock[0] is not loop:
            self._writer_lock = (loop, asyncio.Lock())
        lock = self._writer_lock[1]
        try:
            # asyncio.timeout, not wait_for: wait_for runs the acquire in a task of its own,
            # and a relay cancelled later in its idle wait then never finished cancelling
            # (seen on Python 3.11.7).
            async with asyncio.timeout(SQLITE_BUSY_TIMEOUT):
                await lock.acquire()
        except TimeoutError:
            raise OperationalError(
                "BEGIN IMMEDIATE", None, Exception("database is locked (waited for a writer)")
            ) from None
        try:
            yield
        finally:
            lock.release()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def migrate(self, service: str, migrations: Path) -> None:
        """Brings ``service``'s tables to the newest revision of its Alembic history."""
        async with self.engine.begin() as conn:
            if self.is_postgres:
                # Replicas starting together migrate one at a time.
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(hashtext(:s))"), {"s": service}
                )
            await conn.run_sync(_upgrade, service, migrations)

    async def dispose(self) -> None:
        await self.engine.dispose()


def alembic_config(service: str, migrations: Path) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations))
    cfg.set_main_option("version_table", f"alembic_version_{service}")
    return cfg


def _upgrade(connection: Connection, service: str, migrations: Path) -> None:
    cfg = alembic_config(service, migrations)
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


def run_migrations_online(context: Any, target_metadata: Any) -> None:
    """The body of every service's migrations/env.py: migrate on the connection handed in."""
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations through `learnmesh migrate`, not the alembic CLI")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=context.config.get_main_option("version_table"),
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
