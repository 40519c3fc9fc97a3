"""The file service: streamed, checked, atomic uploads and downloads
(learnmesh.file.v1.FileService).

Exports ``SERVICE`` for the runtime; the servicer and its dependencies load only when the
service is built.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from learnmesh.file.v1 import file_pb2_grpc
from learnmesh.service import ServiceDefinition

if TYPE_CHECKING:
    from learnmesh.eventing.handlers import Handlers
    from learnmesh.service import Runtime
    from services.file.servicer import FileServicer

FULL_NAME = "learnmesh.file.v1.FileService"
# The ACCESS_OWNER methods: the file's owner (or an admin) may call them.
OWNED = ("GetFile", "Download", "DeleteFile")


async def create(runtime: Runtime) -> FileServicer:
    """Builds the servicer and starts its orphan sweep."""
    from services.file import user_events
    from services.file.library import Library
    from services.file.servicer import FileServicer
    from services.file.storage import storage_from_url
    from services.file.sweeper import Sweeper
    from services.file.uploads import Uploads

    settings = runtime.settings.file
    storage = storage_from_url(settings.store_url, runtime.settings.var_path)
    sweeper = Sweeper(runtime.db, storage, settings.sweep_interval)
    servicer = FileServicer(
        Uploads(runtime.db, storage, settings),
        Library(runtime.db, storage, settings),
        sweeper,
        user_events.consumed(),
    )
    sweeper.start()
    return servicer


def _owner_resolvers(servicer: Any) -> Mapping[str, Callable[[Any], Awaitable[str | None]]]:
    async def owner(request: Any) -> str | None:
        found: str = await servicer.library.owner_of(request.file_id)
        return found

    return {f"/{FULL_NAME}/{method}": owner for method in OWNED}


def _consumes(servicer: Any) -> Handlers:
    handlers: Handlers = servicer.consumes
    return handlers


SERVICE = ServiceDefinition(
    name="file",
    full_name=FULL_NAME,
    add_to_server=file_pb2_grpc.add_FileServiceServicer_to_server,
    create=create,
    migrations=Path(__file__).resolve().parent / "migrations",
    owner_resolvers=_owner_resolvers,
    audit_table="file_audit",
    event_tables="file",
    consumes=_consumes,
)
