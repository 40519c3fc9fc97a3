"""What a service package hands the runtime, and what the runtime hands back."""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from learnmesh.kernel.revocations import RevocationList

if TYPE_CHECKING:
    from learnmesh.client import ClientFactory
    from learnmesh.config import Settings
    from learnmesh.db import Database
    from learnmesh.eventing.bus import Bus
    from learnmesh.eventing.handlers import Handlers

# Services with an implementation, by short name. Notification exists as protos only so
# far.
IMPLEMENTED = {
    "auth": "services.auth",
    "user": "services.user",
    "course": "services.course",
    "file": "services.file",
}


@dataclass
class Runtime:
    """The process-wide parts a service is built from."""

    settings: Settings
    db: Database
    clients: ClientFactory
    # The process's one event bus (learnmesh.eventing.wiring.make_bus), shared by its
    # services' relays and consumers; started and closed by the server (MeshServer).
    bus: Bus
    # With mTLS: the certificate each service presents on its outbound calls, by name.
    identity: Callable[[str], grpc.ChannelCredentials] | None = None
    # The process's revoked tokens (one list: the auth link and IntrospectToken agree).
    revocations: RevocationList = field(default_factory=RevocationList)
    _children: list[ClientFactory] = field(default_factory=list)

    def for_service(self, name: str) -> Runtime:
        """The runtime one service is built with: its outbound calls carry its identity."""
        if self.identity is None:
            return self
        from learnmesh.client import ClientFactory

        clients = ClientFactory(
            self.settings,
            credentials=self.identity(name),
            interceptors=self.clients.interceptors,
            local_address=self.clients.local_address,
        )
        self._children.append(clients)
        return Runtime(self.settings, self.db, clients, self.bus, revocations=self.revocations)

    async def close(self) -> None:
        """Closes every channel and the database (the bus is the server's to close)."""
        for clients in [self.clients, *self._children]:
            await clients.close()
        await self.db.dispose()


@dataclass(frozen=True)
class ServiceDefinition:
    name: str  # "auth"
    full_name: str  # "learnmesh.auth.v1.AuthService"
    add_to_server: Callable[[Any, aio.Server], None]
    # Builds the servicer once migrations have run.
    create: Callable[[Runtime], Awaitable[Any]]
    # The service's Alembic folder; None for a service that keeps no tables.
    migrations: Path | None
    # Owner lookups for ACCESS_OWNER methods whose resource is not a user, by full method.
    owner_resolvers: Callable[[Any], Mapping[str, Any]] = field(default=lambda _servicer: {})
    # The service's audit table (``learnmesh.audit.audit_table``), where the server also
    # records the calls of its methods the chain refused; "" for a service keeping none.
    audit_table: str = ""
    # The prefix of the service's event tables (``learnmesh.eventing.tables``: "<prefix>_outbox"
    # and its processed and dead-letter tables, made by its migrations), whose outbox the
    # server relays; "" for a service that emits and consumes nothing.
    event_tables: str = ""
    # The events the service consumes, from its built servicer (the runtime runs their
    # consumers); None for a service consuming none.
    consumes: Callable[[Any], Handlers | None] = field(default=lambda _servicer: None)


def definition(name: str) -> ServiceDefinition:
    """The definition exported as ``SERVICE`` by the service's package."""
    if name not in IMPLEMENTED:
        known = ", ".join(IMPLEMENTED)
        raise SystemExit(f"unknown or unimplemented service {name!r}; available: {known}")
    module = importlib.import_module(IMPLEMENTED[name])
    found: ServiceDefinition = module.SERVICE
    return found
