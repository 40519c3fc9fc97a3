"""The user service's shared secrets (learnmesh.shared_secrets): the key that signs
ListUsers' page tokens, made by the first replica that starts.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from alembic import op

from learnmesh.shared_secrets import create_secrets_table

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    create_secrets_table(op.get_bind(), "user_secrets")


def downgrade() -> None:
    op.drop_table("user_secrets")
