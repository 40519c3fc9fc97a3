"""Alembic environment of the course service (run by ``Database.migrate``)."""

from alembic import context

from learnmesh.db import run_migrations_online
from services.course.store import Base

run_migrations_online(context, Base.metadata)
