"""The tests' certificate authority: the product's own (learnmesh.certs), in a directory of
the test's, issuing the certificates tests present and serve with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from learnmesh import certs

TRUST_DOMAIN = "learnmesh.local"


@dataclass(frozen=True)
class Authority:
    """The CA under ``directory`` (made there unless one is already there, as a mesh's
    own CA is), issuing into the same directory."""

    directory: Path
    trust_domain: str = TRUST_DOMAIN

    def __post_init__(self) -> None:
        certs.init_ca(self.directory, self.trust_domain)

    @property
    def pem(self) -> bytes:
        return certs.ca_paths(self.directory).cert.read_bytes()

    @property
    def ca_file(self) -> Path:
        return certs.ca_paths(self.directory).cert

    def issue(self, name: str, kind: str = "service") -> certs.Identity:
        """A fresh certificate of ``name`` (SPIFFE ID of ``kind``, DNS localhost, IPs
        127.0.0.1 and ::1), replacing any earlier one."""
        return certs.issue(self.directory, name, self.trust_domain, kind=kind)

    def issued(self, name: str) -> certs.Identity:
        """The files of ``name``'s certificate, issued earlier (by the test or the mesh)."""
        return certs.holder_paths(self.directory, name)

    def channel_credentials(
        self, name: str, kind: str = "client", *, trust: bytes | None = None
    ) -> grpc.ChannelCredentials:
        """Client credentials presenting a new certificate of ``name``, trusting this CA
        (or the ``trust`` PEM instead)."""
        key, cert = self.issue(name, kind).read()
        return grpc.ssl_channel_credentials(
            self.pem if trust is None else trust, private_key=key, certificate_chain=cert
        )

    def server_credentials(self, name: str = "server") -> grpc.ServerCredentials:
        """Server credentials of a new certificate of ``name``, requiring a client
        certificate issued by this CA."""
        key, cert = self.issue(name).read()
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=self.pem, require_client_auth=True
        )
