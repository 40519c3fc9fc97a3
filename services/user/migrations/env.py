"""Alembic environment of the user service (run by ``Database.migrate``)."""

from alembic import context

from learnmesh.db import run_migrations_online
from services.user.store import Base

run_migrations_online(context, Base.metadata)
