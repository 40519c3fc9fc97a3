"""The auth service: credentials, tokens, sessions, MFA and password reset.

Exports ``SERVICE`` for the runtime; the servicer and its dependencies load only when the
service is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from learnmesh.auth.v1 import auth_pb2_grpc
from learnmesh.service import Runtime, ServiceDefinition

if TYPE_CHECKING:
    from learnmesh.eventing.handlers import Handlers


async def _create(runtime: Runtime) -> Any:
    from services.auth.servicer import create

    return await create(runtime)


def _consumes(servicer: Any) -> Handlers:
    handlers: Handlers = servicer.rules.consumes
    return handlers


SERVICE = ServiceDefinition(
    name="auth",
    full_name="learnmesh.auth.v1.AuthService",
    add_to_server=auth_pb2_grpc.add_AuthServiceServicer_to_server,
    create=_create,
    migrations=Path(__file__).resolve().parent / "migrations",
    audit_table="auth_audit",
    event_tables="auth",
    consumes=_consumes,
)
