"""What every auth use case is built from: the runtime, the crypto parts, the user service.

One ``Deps`` is made at start (``wiring.build``) and shared by the use-case modules, so
none of them builds keys, hashers or clients of its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from learnmesh import audit
from learnmesh.config import AuthSettings
from learnmesh.kernel import principal
from learnmesh.service import Runtime
from services.auth import mfa, store
from services.auth.passwords import Passwords
from services.auth.tokens import Tokens
from services.auth.users import UserDirectory


def lock_id(name: str) -> int:
    """A stable signed 64-bit number for ``name`` (a PostgreSQL advisory lock key)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big", signed=True)


@dataclass(frozen=True)
class Deps:
    runtime: Runtime
    passwords: Passwords
    tokens: Tokens
    box: mfa.SecretBox
    users: UserDirectory

    @property
    def settings(self) -> AuthSettings:
        return self.runtime.settings.auth

    def transaction(self) -> Any:
        """A session in a transaction (committed on success, rolled back on error)."""
        return self.runtime.db.transaction()

    @asynccontextmanager
    async def serialised(self, *names: str) -> AsyncIterator[AsyncSession]:
        """A transaction that runs alone among those serialised on any of ``names``:
        PostgreSQL takes transaction-scoped advisory locks (in a fixed order, so two
        callers never wait on each other in a cycle); SQLite starts the transaction with
        BEGIN IMMEDIATE, taking the database's one write lock before the first read."""
        db = self.runtime.db
        async with db.transaction() as session:
            if db.is_postgres:
                for key in sorted({lock_id(name) for name in names}):
                    await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
            else:
                await session.execute(text("BEGIN IMMEDIATE"))
            yield session

    async def audit_now(self, event: str, subject: str, **details: Any) -> None:
        """Records one event in a transaction of its own, committed before the caller goes
        on (a failing call's rollback cannot lose it)."""
        async with self.transaction() as session:
            await audit.record(session, store.audit, event, subject, **details)


def actor_for(subject: str) -> str:
    """The signed-in caller when it is not ``subject`` (an admin acting on a user)."""
    caller = principal.current_or_none()
    return caller.user_id if caller is not None and caller.user_id != subject else ""
