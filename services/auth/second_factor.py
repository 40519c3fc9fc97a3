"""Checking a second factor: a TOTP code of the account's secret.

Shared by sign-in and the MFA management calls; the secret is decrypted only here.
"""

from __future__ import annotations

import logging

from learnmesh import audit
from services.auth import mfa, store
from services.auth.deps import Deps

log = logging.getLogger("learnmesh.auth")

BAD_MFA_CODE = "the code is wrong, expired or was already used"


class SecondFactor:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    async def accept_code(self, row: store.Mfa, code: str, *, enable: bool = False) -> bool:
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
        return True

    def open_secret(self, row: store.Mfa) -> str:
        try:
            return self.deps.box.open(row.user_id, mfa.Sealed(row.key_id, row.ciphertext))
        except (KeyError, mfa.InvalidTag):
            # A missing or wrong key is an operator problem; never a reason to let anyone in.
            log.error(
                "cannot decrypt the MFA secret of user %s (key id %s)", row.user_id, row.key_id
            )
            raise RuntimeError("MFA secret cannot be decrypted") from None
