"""The SQLite database and its -wal/-shm files are private (0600) like the keys, whatever
the umask: checked with os.stat on a real mesh that has written to them."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from learnmesh.db import Database
from tests.conftest import mesh_settings, running_mesh


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def umask(value: int) -> Iterator[None]:
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


async def test_database_and_its_wal_files_are_private_after_writes(tmp_path: Path) -> None:
    db = tmp_path / "learnmesh.db"
    settings = mesh_settings(tmp_path, f"sqlite+aiosqlite:///{db}")
    settings = replace(settings, tls=replace(settings.tls, enabled=False))
    # The most permissive umask: without an explicit mode SQLite would make these 0666.
    with umask(0):
        async with running_mesh(settings) as mesh:
            await mesh.register()  # writes to the auth and user tables
            files = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
            assert all(f.exists() for f in files), sorted(os.listdir(tmp_path))
            assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
    with sqlite3.connect(db) as conn:  # the writes landed in that file
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0


async def test_an_existing_world_readable_database_is_made_private(tmp_path: Path) -> None:
    """An installation from before the fix: the files exist, readable by everyone."""
    db = tmp_path / "old.db"
    # An open writer keeps the -wal and -shm files in place.
    older = sqlite3.connect(db)
    try:
        older.execute("PRAGMA journal_mode=WAL")
        older.execute("CREATE TABLE t (x)")
        older.commit()
        files = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
        for path in files:
            path.chmod(0o644)
        database = Database(f"sqlite+aiosqlite:///{db}")
        try:
            assert [mode(f) for f in files] == [0o600, 0o600, 0o600]
            await database.ping()
        finally:
            await database.dispose()
    finally:
        older.close()


async def test_in_memory_sqlite_creates_no_file(tmp_path: Path) -> None:
    before = set(Path.cwd().iterdir())
    database = Database("sqlite+aiosqlite://")
    try:
        await database.ping()
    finally:
        await database.dispose()
    assert set(Path.cwd().iterdir()) == before
