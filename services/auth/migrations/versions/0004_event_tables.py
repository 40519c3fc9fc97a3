"""The auth service's event tables: its outbox, and as a consumer the events it has
processed and those it gave up on (learnmesh.eventing.tables, docs/events.md).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from alembic import op

from learnmesh.eventing.tables import create_event_tables, drop_event_tables

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    create_event_tables(op.get_bind(), "auth")


def downgrade() -> None:
    drop_event_tables(op.get_bind(), "auth")
