"""ES256 signing keys: PEM files in one directory, the newest (or the configured) one signs.

Rotation works by dropping a new PEM into the directory: every key there is published in
the JWKS (so tokens signed with an older key keep verifying until it is removed), and the
newest file, or ``auth.jwt_active_kid``, signs new tokens. The directory is rescanned every
``rescan_every`` seconds, so a rotation needs no restart. On first start an empty
directory gets one fresh key, written with mode 0600.

A key's id is its RFC 7638 JWK thumbprint, so the same key has the same ``kid`` everywhere.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from learnmesh.config import ConfigError, Settings
from services.auth.keyfiles import dir_lock, write_private

log = logging.getLogger("learnmesh.auth.keys")

ALGORITHM = "ES256"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The required members of a P-256 public JWK (RFC 7518 §6.2.1)."""
    numbers = public_key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url(numbers.x.to_bytes(32, "big")),
        "y": _b64url(numbers.y.to_bytes(32, "big")),
    }


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, without whitespace."""
    canonical = json.dumps(
        {name: jwk[name] for name in ("crv", "kty", "x", "y")}, separators=(",", ":")
    )
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: ec.EllipticCurvePrivateKey
    path: Path
    modified: float

    @property
    def jwk(self) -> dict[str, str]:
        return {**public_jwk(self.private_key.public_key()), "kid": self.kid}


def keys_dir(settings: Settings) -> Path:
    return Path(settings.auth.jwt_keys_dir or Path(settings.var_dir) / "keys" / "jwt")


def _pem_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.pem") if p.is_file())


def _load_key(path: Path) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"auth.jwt_keys_dir: {path} is not an unencrypted PEM private key") from (
            exc
        )
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"auth.jwt_keys_dir: {path} is not a P-256 (ES256) key")
    kid = thumbprint(public_jwk(key.public_key()))
    return SigningKey(kid=kid, private_key=key, path=path, modified=path.stat().st_mtime)


def create_key(directory: Path) -> Path:
    """Writes a fresh P-256 key named after its kid; returns its path."""
    key = ec.generate_private_key(ec.SECP256R1())
    kid = thumbprint(public_jwk(key.public_key()))
    path = directory / f"{kid}.pem"
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(path, pem)
    return path


def load_keys(directory: Path, *, create_if_empty: bool = True) -> list[SigningKey]:
    """Every key in ``directory``, oldest first; makes one when there is none."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if create_if_empty and not _pem_files(directory):
        with dir_lock(directory):
            if not _pem_files(directory):
                path = create_key(directory)
                log.info("made a new JWT signing key %s", path)
    keys = [_load_key(path) for path in _pem_files(directory)]
    keys.sort(key=lambda k: (k.modified, k.path.name))
    return keys


def _listing(directory: Path) -> tuple[tuple[str, float], ...]:
    return tuple((p.name, p.stat().st_mtime) for p in _pem_files(directory))


class KeyRing:
    """The signing keys of the auth service, rescanned from disk now and then."""

    def __init__(self, settings: Settings, *, rescan_every: float = 30.0) -> None:
        self.directory = keys_dir(settings)
        self.active_kid = settings.auth.jwt_active_kid
        self.rescan_every = rescan_every
        self._keys: dict[str, SigningKey] = {}
        self._active: SigningKey | None = None
        self._listing: tuple[tuple[str, float], ...] = ()
        self._scanned_at = float("-inf")
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Loads (or makes) the keys; a bad key or kid stops start-up."""
        await asyncio.to_thread(self._scan, True)
        self._scanned_at = time.monotonic()

    def _scan(self, strict: bool) -> None:
        listing = _listing(self.directory) if self.directory.is_dir() else ()
        if listing and listing == self._listing:
            return
        keys = load_keys(self.directory)
        by_kid = {k.kid: k for k in keys}
        if self.active_kid:
            active = by_kid.get(self.active_kid)
            if active is None:
                message = (
                    f"auth.jwt_active_kid: no key with kid {self.active_kid!r} in "
                    f"{self.directory}; found: {', '.join(by_kid) or 'none'}"
                )
                if strict:
                    raise ConfigError(message)
                log.error("%s; keeping the keys loaded before", message)
                return
        else:
            active = keys[-1]
        self._keys, self._active = by_kid, active
        self._listing = _listing(self.directory)

    async def _maybe_rescan(self) -> None:
        if time.monotonic() - self._scanned_at < self.rescan_every:
            return
        async with self._lock:
            if time.monotonic() - self._scanned_at < self.rescan_every:
                return
            try:
                await asyncio.to_thread(self._scan, False)
            except (OSError, ConfigError) as exc:
                log.error("could not rescan the JWT keys, keeping the loaded ones: %s", exc)
            self._scanned_at = time.monotonic()

    async def active(self) -> SigningKey:
        await self._maybe_rescan()
        if self._active is None:
            raise RuntimeError("KeyRing.start() was not called")
        return self._active

    async def public_key(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        await self._maybe_rescan()
        key = self._keys.get(kid)
        return key.private_key.public_key() if key is not None else None

    async def jwks(self) -> list[dict[str, str]]:
        """Every key's public JWK, with alg and use."""
        await self._maybe_rescan()
        return [{**key.jwk, "alg": ALGORITHM, "use": "sig"} for key in self._keys.values()]
