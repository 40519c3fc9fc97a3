"""The course service's first schema: courses with their full-text search, lessons,
enrolments and completed lessons, instructors' last known names, shared secrets, the
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
from learnmesh.shared_secrets import create_secrets_table

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = sa.text("archived_at IS NULL")

# SQLite: an FTS5 index over title and description whose rowid is the course's seq,
# reading its text from course_courses (external content) and kept by these triggers.
SQLITE_SEARCH = [
    "CREATE VIRTUAL TABLE course_search USING fts5(title, description, "
    "content='course_courses', content_rowid='seq', "
    "tokenize='porter unicode61 remove_diacritics 0')",
    "CREATE TRIGGER course_search_insert AFTER INSERT ON course_courses BEGIN "
    "INSERT INTO course_search(rowid, title, description) "
    "VALUES (new.seq, new.title, new.description); END",
    "CREATE TRIGGER course_search_delete AFTER DELETE ON course_courses BEGIN "
    "INSERT INTO course_search(course_search, rowid, title, description) "
    "VALUES ('delete', old.seq, old.title, old.description); END",
    "CREATE TRIGGER course_search_update AFTER UPDATE OF title, description ON course_courses "
    "BEGIN "
    "INSERT INTO course_search(course_search, rowid, title, description) "
    "VALUES ('delete', old.seq, old.title, old.description); "
    "INSERT INTO course_search(rowid, title, description) "
    "VALUES (new.seq, new.title, new.description); END",
]
# PostgreSQL: generated tsvectors (English stemming and stop words), the whole text
# indexed with GIN; the title's alone tells the ranking which courses match in the title.
POSTGRES_SEARCH = [
    "ALTER TABLE course_courses ADD COLUMN search_vector tsvector GENERATED ALWAYS AS "
    "(to_tsvector('english', title || ' ' || description)) STORED",
    "ALTER TABLE course_courses ADD COLUMN title_vector tsvector GENERATED ALWAYS AS "
    "(to_tsvector('english', title)) STORED",
    "CREATE INDEX ix_course_courses_search ON course_courses USING gin (search_vector) "
    "WHERE archived_at IS NULL",
]


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    title_key = sa.String(800, collation="C") if dialect == "postgresql" else sa.String(800)
    op.create_table(
        "course_courses",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("instructor_id", sa.String(36), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("title_key", title_key, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("category", sa.String(50), nullable=False),
        sa.Column("category_key", sa.String(200), nullable=False),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("lesson_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("enrollment_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("id", name="uq_course_courses_id"),
    )
    op.create_index("ix_course_courses_instructor_id", "course_courses", ["instructor_id"])
    for name, columns in (
        ("ix_course_courses_created", ["created_at", "id"]),
        ("ix_course_courses_title", ["title_key", "id"]),
        ("ix_course_courses_enrolled", ["enrollment_count", "id"]),
        ("ix_course_courses_category", ["category_key", "created_at", "id"]),
    ):
        op.create_index(
            name, "course_courses", columns, sqlite_where=ACTIVE, postgresql_where=ACTIVE
        )
    for statement in POSTGRES_SEARCH if dialect == "postgresql" else SQLITE_SEARCH:
        op.execute(statement)

    op.create_table(
        "course_lessons",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("course_id", sa.String(36), sa.ForeignKey("course_courses.id"), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("duration_minutes", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("course_id", "position", name="uq_course_lessons_position"),
    )
    op.create_table(
        "course_enrollments",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("course_id", sa.String(36), sa.ForeignKey("course_courses.id"), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("course_id", "user_id", name="uq_course_enrollments"),
    )
    op.create_index("ix_course_enrollments_user_id", "course_enrollments", ["user_id"])
    op.create_table(
        "course_completions",
        sa.Column(
            "enrollment_id",
            sa.String(36),
            sa.ForeignKey("course_enrollments.id"),
            primary_key=True,
        ),
        sa.Column("lesson_id", sa.String(36), sa.ForeignKey("course_lessons.id"), primary_key=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "course_instructors",
        sa.Column("user_id", sa.String(36), primary_key=True),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("refresh_due", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    create_secrets_table(op.get_bind(), "course_secrets")

    op.create_table(
        "course_audit",
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
    op.create_index("ix_course_audit_at", "course_audit", ["at"])
    op.create_index("ix_course_audit_event", "course_audit", ["event"])
    op.create_index("ix_course_audit_subject", "course_audit", ["subject"])
    for statement in append_only_ddl("course_audit", dialect):
        op.execute(statement)

    create_event_tables(op.get_bind(), "course")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    drop_event_tables(op.get_bind(), "course")
    if dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS course_audit_no_update ON course_audit")
        op.execute("DROP FUNCTION IF EXISTS course_audit_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS course_audit_no_update")
        op.execute("DROP TRIGGER IF EXISTS course_audit_no_delete")
        for trigger in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS course_search_{trigger}")
        op.execute("DROP TABLE IF EXISTS course_search")
    for name in ("course_audit", "course_secrets", "course_instructors", "course_completions"):
        op.drop_table(name)
    op.drop_table("course_enrollments")
    op.drop_table("course_lessons")
    op.drop_table("course_courses")
