"""Alembic environment of the file service (run by ``Database.migrate``)."""

from alembic import context

from learnmesh.db import run_migrations_online
from services.file.store import Base

run_migrations_online(context, Base.metadata)
