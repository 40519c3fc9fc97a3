"""The user_audit trail keeps the server-made call id next to the caller's request id.

Adding a column is not an UPDATE, so the append-only triggers are not involved; rows from
before this revision get an empty call id.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ALTER TABLE ADD COLUMN on both backends (no batch copy on SQLite, which
    # would drop the table's triggers).
    op.add_column(
        "user_audit",
        sa.Column("call_id", sa.String(64), nullable=False, server_default=""),
    )


def downgrade() -> None:
    op.drop_column("user_audit", "call_id")
