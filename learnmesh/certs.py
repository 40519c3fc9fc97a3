"""The mesh's certificate authority and the certificates it issues.

Every certificate names its holder with exactly one URI SAN, a SPIFFE ID:
``spiffe://<trust-domain>/service/<name>`` for mesh services, ``…/client/<name>`` for
other callers. Servers also carry DNS/IP SANs so clients can verify the host they dial.
Keys are EC P-256, written with mode 0600.

A holder's name becomes both a file name (``<name>.pem``, ``<name>-key.pem``) and a SPIFFE
path segment, so it is held to a safe charset (:data:`NAME_PATTERN`); ``ca`` and names
ending ``-key`` are refused because their files would be (or collide with) the CA's or
another holder's key. Each file is replaced atomically (written beside, then renamed), so a
process reading one during a rotation never sees half a file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DNS = ("localhost",)
DEFAULT_IPS = ("127.0.0.1", "::1")
# Lower-case letters, digits, '.', '_' and '-', starting with a letter or digit (so never a
# dot file, a path separator or ".."), at most 63 characters.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
CA_NAME = "ca"


def check_name(name: str) -> str:
    """``name`` if it may name a certificate holder, else ValueError saying why."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"invalid certificate name {name!r}: use 1 to 63 of a-z 0-9 . _ -, "
            "starting with a letter or digit (no path separators, no leading dot)"
        )
    if name == CA_NAME:
        raise ValueError(f"{name!r} is reserved for the CA itself, which is never reissued")
    if name.endswith("-key"):
        raise ValueError(f"invalid certificate name {name!r}: names may not end in -key")
    return name


def spiffe_id(trust_domain: str, name: str, kind: str = "service") -> str:
    return f"spiffe://{trust_domain}/{kind}/{name}"


@dataclass(frozen=True)
class Identity:
    """PEM files of one holder (a service, a client, or the CA itself)."""

    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes]:
        return self.key.read_bytes(), self.cert.read_bytes()


def _write(path: Path, data: bytes, mode: int) -> None:
    """Writes ``data`` to ``path`` with ``mode`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _write_private(path: Path, data: bytes) -> None:
    _write(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write(path, data, 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def ca_paths(directory: Path) -> Identity:
    return Identity(directory / "ca.pem", directory / "ca-key.pem")


def holder_paths(directory: Path, name: str) -> Identity:
    """Where ``name``'s certificate and key live under ``directory`` (name checked)."""
    check_name(name)
    return Identity(directory / f"{name}.pem", directory / f"{name}-key.pem")


def init_ca(directory: Path, trust_domain: str, *, days: int = 3650) -> Identity:
    """Makes a CA under ``directory`` (ca.pem, ca-key.pem) unless one is there."""
    paths = ca_paths(directory)
    if paths.cert.exists() and paths.key.exists():
        return paths
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "learnmesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"learnmesh CA ({trust_domain})"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(paths.key, _key_pem(key))
    _write_public(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
    return paths


def issue(
    directory: Path,
    name: str,
    trust_domain: str,
    *,
    kind: str = "service",
    dns: tuple[str, ...] = DEFAULT_DNS,
    ips: tuple[str, ...] = DEFAULT_IPS,
    days: int = 90,
    ca: Identity | None = None,
    overwrite: bool = True,
) -> Identity:
    """Issues ``<name>.pem`` / ``<name>-key.pem`` signed by the CA in ``directory``.

    ``name`` must pass :func:`check_name` (so the CA's files are never touched); with
    ``overwrite=False`` (the CLI without ``--force``) an existing pair is left alone and
    FileExistsError is raised.
    """
    if kind not in ("service", "client"):
        raise ValueError("kind must be service or client")
    paths = holder_paths(directory, name)
    if not overwrite:
        for existing in (paths.cert, paths.key):
            if existing.exists():
                raise FileExistsError(
                    f"{existing} exists; pass --force to replace the certificate of {name!r}"
                )
    ca = ca or ca_paths(directory)
    if not ca.cert.exists():
        raise FileNotFoundError(f"no CA at {ca.cert}; run `learnmesh certs init` first")
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca.key} is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(spiffe_id(trust_domain, name, kind))
    ]
    sans += [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "learnmesh"),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(paths.key, _key_pem(key))
    _write_public(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
    return paths


def ensure(directory: Path, name: str, trust_domain: str, *, kind: str = "service") -> Identity:
    """The CA and ``name``'s certificate under ``directory``, made if missing or about to
    expire (the dev default)."""
    init_ca(directory, trust_domain)
    paths = holder_paths(directory, name)
    if paths.cert.exists() and paths.key.exists():
        cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        if cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=1):
            return paths
    return issue(directory, name, trust_domain, kind=kind)
