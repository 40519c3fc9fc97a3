"""Checking a second factor: a TOTP code of the account's secret, or a recovery code.

Shared by sign-in and the MFA management calls; the secret is decrypted only here, and
recovery codes are made and spent only here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncSession

from learnmesh import audit
from services.auth import mfa, store
from services.auth.deps import Deps

log = logging.getLogger("learnmesh.auth")

BAD_MFA_CODE = "the code is wrong, expired or was already used"
BAD_RECOVERY_CODE = "the recovery code is wrong or was already used"

# Work done in the transaction that accepts a code (for example, storing recovery codes).
OnAccept = Callable[[AsyncSession], Awaitable[None]]


class SecondFactor:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    async def accept_code(
        self,
        row: store.Mfa,
        code: str,
        *,
        enable: bool = False,
        on_accept: OnAccept | None = None,
    ) -> bool:
        """True when ``code`` is good now and its step was not used before; the step is
        claimed atomically, so the same code cannot win twice even concurrently."""
        deps = self.deps
        secret = self.open_secret(row)
        step = mfa.matching_step(secret, code, row.last_step)
        if step < 0:
            return False
        async with deps.transaction() as session:
            if not await store.claim_step(session, row.user_id, step, enable=enable):
                return False
            if row.key_id != deps.box.encrypt_kid:
                # Re-encrypt under the newest key, so an old key can be retired.
                sealed = deps.box.seal(row.user_id, secret)
                await store.reseal_mfa(session, row.user_id, sealed.key_id, sealed.ciphertext)
            if enable:
                await audit.record(session, store.audit, "mfa.enabled", row.user_id)
            if on_accept is not None:
                await on_accept(session)
        return True

    async def spend_recovery_code(self, user_id: str, code: str) -> bool:
        """True when ``code`` is one of the user's unused recovery codes; it is spent in
        the same step (single use, even concurrently) and the use is audited."""
        box = self.deps.box
        async with self.deps.transaction() as session:
            if not await store.use_recovery_code(
                session, user_id, box.recovery_digests(user_id, code)
            ):
                return False
            left = await store.count_unused_recovery_codes(session, user_id)
            await audit.record(
                session, store.audit, "mfa.recovery_code_used", user_id, codes_left=left
            )
        return True

    async def new_recovery_codes(self, session: AsyncSession, user_id: str) -> list[str]:
        """Fresh recovery codes for the user (replacing any), stored only as digests."""
        box = self.deps.box
        codes = [mfa.new_recovery_code() for _ in range(mfa.RECOVERY_CODES)]
        await store.replace_recovery_codes(
            session,
            user_id,
            box.encrypt_kid,
            [box.recovery_digest(user_id, code) for code in codes],
        )
        return codes

    def open_secret(self, row: store.Mfa) -> str:
        try:
            return self.deps.box.open(row.user_id, mfa.Sealed(row.key_id, row.ciphertext))
        except (KeyError, mfa.InvalidTag):
            # A missing or wrong key is an operator problem; never a reason to let anyone in.
            log.error(
                "cannot decrypt the MFA secret of user %s (key id %s)", row.user_id, row.key_id
            )
            raise RuntimeError("MFA secret cannot be decrypted") from None
