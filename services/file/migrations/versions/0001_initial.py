"""The file service's first schema: files, the upload log the hourly limits count, the
append-only audit trail and the event tables.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from learnmesh.audit import append_only_ddl
from learnmesh.eventing.tables import create_event_tables, drop_event_tables

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "file_files",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner_id", sa.String(36), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("content_type", sa.String(127), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("storage_key", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("storage_key", name="uq_file_files_storage_key"),
    )
    op.create_index("ix_file_files_owner_id", "file_files", ["owner_id"])
    op.create_table(
        "file_upload_log",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner_id", sa.String(36), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_file_upload_log_owner_at", "file_upload_log", ["owner_id", "purpose", "at"])
    op.create_table(
        "file_audit",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False, server_default=""),
        sa.Column("client_address", sa.String(64), nullable=False, server_default=""),
        sa.Column("request_id", sa.String(128), nullable=False, server_default=""),
        sa.Column("call_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("details", sa.Text, nullable=False, server_default="{}"),
    )
    op.create_index("ix_file_audit_at", "file_audit", ["at"])
    op.create_index("ix_file_audit_event", "file_audit", ["event"])
    op.create_index("ix_file_audit_subject", "file_audit", ["subject"])
    for statement in append_only_ddl("file_audit", op.get_bind().dialect.name):
        op.execute(statement)
    create_event_tables(op.get_bind(), "file")


def downgrade() -> None:
    drop_event_tables(op.get_bind(), "file")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS file_audit_no_update ON file_audit")
        op.execute("DROP FUNCTION IF EXISTS file_audit_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS file_audit_no_update")
        op.execute("DROP TRIGGER IF EXISTS file_audit_no_delete")
    op.drop_table("file_audit")
    op.drop_table("file_upload_log")
    op.drop_table("file_files")
