"""What every auth use case is built from: the runtime, the crypto parts, the user service.

One ``Deps`` is made at start (``wiring.build``) and shared by the use-case modules, so
none of them builds keys, hashers or clients of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from learnmesh import audit
from learnmesh.config import AuthSettings
from learnmesh.kernel import principal
from learnmesh.service import Runtime
from services.auth import mfa, store
from services.auth.passwords import Passwords
from services.auth.tokens import Tokens
from services.auth.users import UserDirectory


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

    def serialised(self, *names: str) -> Any:
        """A transaction alone among those serialised on any of ``names``
        (``Database.serialised``)."""
        return self.runtime.db.serialised(*names)

    async def audit_now(self, event: str, subject: str, **details: Any) -> None:
        """Records one event in a transaction of its own, committed before the caller goes
        on (a failing call's rollback cannot lose it)."""
        async with self.transaction() as session:
            await audit.record(session, store.audit, event, subject, **details)


def actor_for(subject: str) -> str:
    """The signed-in caller when it is not ``subject`` (an admin acting on a user)."""
    caller = principal.current_or_none()
    return caller.user_id if caller is not None and caller.user_id != subject else ""
