"""The user service's first schema: profiles and the append-only audit trail.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from learnmesh.audit import append_only_ddl

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "user_profiles",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("display_name", sa.String(50), nullable=False),
        sa.Column("avatar_url", sa.String(512), nullable=False, server_default=""),
        sa.Column("bio", sa.Text, nullable=False, server_default=""),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("tier", sa.String(32), nullable=False),
        sa.Column("preferences", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("email", name="uq_user_profiles_email"),
    )
    op.create_index("ix_user_profiles_created_at_id", "user_profiles", ["created_at", "id"])
    op.create_index("ix_user_profiles_role", "user_profiles", ["role"])

    op.create_table(
        "user_audit",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False, server_default=""),
        sa.Column("client_address", sa.String(64), nullable=False, server_default=""),
        sa.Column("request_id", sa.String(128), nullable=False, server_default=""),
        sa.Column("details", sa.Text, nullable=False, server_default="{}"),
    )
    op.create_index("ix_user_audit_at", "user_audit", ["at"])
    op.create_index("ix_user_audit_event", "user_audit", ["event"])
    op.create_index("ix_user_audit_subject", "user_audit", ["subject"])
    for statement in append_only_ddl("user_audit", op.get_bind().dialect.name):
        op.execute(statement)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS user_audit_no_update ON user_audit")
        op.execute("DROP FUNCTION IF EXISTS user_audit_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS user_audit_no_update")
        op.execute("DROP TRIGGER IF EXISTS user_audit_no_delete")
    op.drop_table("user_audit")
    op.drop_index("ix_user_profiles_role", table_name="user_profiles")
    op.drop_index("ix_user_profiles_created_at_id", table_name="user_profiles")
    op.drop_table("user_profiles")
