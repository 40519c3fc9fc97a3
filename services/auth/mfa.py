"""TOTP second factor (RFC 6238) and the encryption of its secrets at rest.

Codes use a 30-second step and are accepted one step either side of now. The step of the
last accepted code is stored, and only a later step is accepted afterwards, so a code
(or an older one) never works twice.

Secrets are encrypted with AES-256-GCM under a key id: ``auth.mfa_keys`` lists
``kid:base64key`` pairs (the first encrypts, all decrypt), so keys rotate by putting a new
one first. When none are configured, a key is made on first start under
``<var_dir>/keys/mfa`` (mode 0600). The user id is the associated data, so a ciphertext
copied onto another account does not decrypt.

Recovery codes (80 random bits each, shown once) are stored only as HMAC-SHA256 digests
under a key derived (HKDF) from an MFA key, bound to the user id: a leaked table gives
nothing to brute-force offline without the key. A code matches under any known key, so
keys rotate as for secrets; codes made under a retired key stop working.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import pyotp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from learnmesh.config import ConfigError, Settings
from services.auth.keyfiles import dir_lock, write_private

log = logging.getLogger("learnmesh.auth.mfa")

STEP = 30  # seconds (RFC 6238's default)
WINDOW = 1  # steps accepted either side of now
ISSUER = "learnmesh"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
_AAD_PREFIX = b"learnmesh.auth.mfa:"
RECOVERY_CODES = 10  # given at ConfirmMfa
_RECOVERY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # base32: no 0/1/8/9 to misread
_RECOVERY_INFO = b"learnmesh.auth.mfa.recovery-codes"


def new_secret() -> str:
    """A base32 TOTP secret of 160 bits (RFC 4226's recommended length)."""
    return pyotp.random_base32(32)


def otpauth_uri(secret: str, account: str) -> str:
    return pyotp.TOTP(secret, interval=STEP).provisioning_uri(name=account, issuer_name=ISSUER)


def matching_step(secret: str, code: str, after_step: int | None, now: float | None = None) -> int:
    """The time step ``code`` belongs to (within ±WINDOW of now and later than
    ``after_step``), or -1 when it matches none."""
    totp = pyotp.TOTP(secret, interval=STEP)
    current = int((time.time() if now is None else now) // STEP)
    found = -1
    for step in range(current - WINDOW, current + WINDOW + 1):
        if after_step is not None and step <= after_step:
            continue
        # Compare every candidate (no early exit), in constant time.
        if hmac.compare_digest(totp.at(step * STEP), code) and found < 0:
            found = step
    return found


def new_recovery_code() -> str:
    """``ABCD-EFGH-JKLM-NPQR``: 16 base32 characters (80 bits) in groups of four."""
    raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(16))
    return "-".join(raw[i : i + 4] for i in range(0, 16, 4))


def normal_recovery_code(code: str) -> str:
    """The form that is hashed: upper case, no dashes or spaces."""
    return code.replace("-", "").replace(" ", "").upper()


@dataclass(frozen=True)
class Sealed:
    key_id: str
    ciphertext: bytes  # nonce || AES-GCM output


def _decode_key(text: str) -> bytes:
    text = text.strip()
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        with contextlib.suppress(binascii.Error, ValueError):
            key = decode(text + "=" * (-len(text) % 4))
            if len(key) == KEY_BYTES:
                return key
    raise ValueError("not the base64 of 32 bytes")


def parse_keys(spec: str) -> list[tuple[str, bytes]]:
    """``kid:base64key,kid2:base64key`` → [(kid, key)], in order; raises ConfigError."""
    keys: list[tuple[str, bytes]] = []
    for number, entry in enumerate(spec.split(","), start=1):
        kid, sep, material = entry.strip().partition(":")
        kid = kid.strip()
        if not sep or not kid or len(kid) > 64:
            raise ConfigError(
                f"auth.mfa_keys: entry {number} must be 'kid:base64key' (kid up to 64 characters)"
            )
        try:
            keys.append((kid, _decode_key(material)))
        except ValueError:
            raise ConfigError(
                f"auth.mfa_keys: entry {number} ({kid}): the key must be the base64 of 32 "
                "random bytes (AES-256)"
            ) from None
    if len({kid for kid, _ in keys}) != len(keys):
        raise ConfigError("auth.mfa_keys: key ids must be unique")
    return keys


def local_keys(directory: Path) -> list[tuple[str, bytes]]:
    """The keys in ``directory`` (``<kid>.key``, base64), newest first; makes one if none."""
    with dir_lock(directory):
        if not any(directory.glob("*.key")):
            kid = "local-" + secrets.token_hex(6)
            key = base64.b64encode(AESGCM.generate_key(bit_length=256)) + b"\n"
            write_private(directory / f"{kid}.key", key)
            log.info("made a new MFA encryption key %s in %s", kid, directory)
    files = sorted(directory.glob("*.key"), key=lambda p: (p.stat().st_mtime, p.name))
    keys: list[tuple[str, bytes]] = []
    for path in reversed(files):
        try:
            keys.append((path.stem, _decode_key(path.read_text())))
        except ValueError:
            raise ConfigError(f"auth.mfa_keys: {path} does not hold a base64 AES-256 key") from None
    return keys


class SecretBox:
    """Encrypts TOTP secrets with the first key; decrypts with any known key."""

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ConfigError("auth.mfa_keys: at least one key is needed")
        self.encrypt_kid = keys[0][0]
        self._ciphers = {kid: AESGCM(key) for kid, key in keys}
        self._mac_keys = {
            kid: HKDF(hashes.SHA256(), 32, salt=None, info=_RECOVERY_INFO).derive(key)
            for kid, key in keys
        }

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        """Blocking (reads or makes key files): call it through asyncio.to_thread."""
        if settings.auth.mfa_keys.strip():
            return cls(parse_keys(settings.auth.mfa_keys))
        return cls(local_keys(Path(settings.var_dir) / "keys" / "mfa"))

    def seal(self, user_id: str, secret: str) -> Sealed:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self.encrypt_kid].encrypt(
            nonce, secret.encode("ascii"), _AAD_PREFIX + user_id.encode("utf-8")
        )
        return Sealed(self.encrypt_kid, nonce + sealed)

    def open(self, user_id: str, sealed: Sealed) -> str:
        """The secret; raises KeyError for an unknown key id, InvalidTag for a bad box."""
        cipher = self._ciphers[sealed.key_id]
        nonce, body = sealed.ciphertext[:NONCE_BYTES], sealed.ciphertext[NONCE_BYTES:]
        return cipher.decrypt(nonce, body, _AAD_PREFIX + user_id.encode("utf-8")).decode("ascii")

    def can_open(self, key_id: str) -> bool:
        return key_id in self._ciphers

    def recovery_digest(self, user_id: str, code: str, key_id: str | None = None) -> str:
        """The stored form of a recovery code: HMAC-SHA256 (hex) under ``key_id``'s
        recovery key (the encrypting key's by default), bound to the user."""
        key = self._mac_keys[key_id or self.encrypt_kid]
        message = f"{user_id}:{normal_recovery_code(code)}".encode()
        return hmac.new(key, message, "sha256").hexdigest()

    def recovery_digests(self, user_id: str, code: str) -> list[str]:
        """The code's digest under every known key (a stored one matches one of them)."""
        return [self.recovery_digest(user_id, code, kid) for kid in self._mac_keys]


__all__ = [
    "InvalidTag",
    "SecretBox",
    "matching_step",
    "new_recovery_code",
    "new_secret",
    "normal_recovery_code",
    "otpauth_uri",
]
