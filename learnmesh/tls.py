"""mTLS credentials of a process, from configured PEM files or the dev CA under var/.

Servers demand a client certificate signed by the mesh's CA; channels present their
service's certificate. grpc-core negotiates TLS 1.2 or newer only.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from learnmesh import certs
from learnmesh.config import Settings


def certs_dir(settings: Settings) -> Path:
    return settings.var_path / "certs"


def identity_files(
    settings: Settings, name: str, kind: str = "service"
) -> tuple[Path, certs.Identity]:
    """(CA file, holder's cert and key): configured ones, else the dev CA's, made if missing."""
    tls = settings.tls
    if tls.ca_file and tls.cert_file and tls.key_file:
        return Path(tls.ca_file), certs.Identity(Path(tls.cert_file), Path(tls.key_file))
    if tls.ca_file or tls.cert_file or tls.key_file:
        raise ValueError("tls.ca_file, tls.cert_file and tls.key_file go together: set all three")
    directory = certs_dir(settings)
    identity = certs.ensure(directory, name, tls.trust_domain, kind=kind)
    return certs.ca_paths(directory).cert, identity


def server_credentials(settings: Settings, name: str) -> grpc.ServerCredentials:
    ca, identity = identity_files(settings, name)
    key, cert = identity.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca.read_bytes(), require_client_auth=True
    )


def channel_credentials(
    settings: Settings, name: str, kind: str = "service"
) -> grpc.ChannelCredentials:
    ca, identity = identity_files(settings, name, kind)
    key, cert = identity.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(), private_key=key, certificate_chain=cert
    )
