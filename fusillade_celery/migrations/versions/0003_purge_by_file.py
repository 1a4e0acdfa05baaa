"""Purging a file's templates looks its batches up by file, not every request by template:
requests.template_id loses its foreign key (no index serves it, so deleting a template read
every request, and checking it was a quarter of a submit's insert) and batches.file_id gains
an index (the look-up of a file's batches)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 08:30:00
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

FK = "fk_requests_template_id_request_templates"


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:  # SQLite rebuilds the table
        batch.drop_constraint(FK, type_="foreignkey")
    op.create_index("ix_batches_file_id", "batches", ["file_id"])


def downgrade() -> None:
    op.drop_index("ix_batches_file_id", table_name="batches")
    with op.batch_alter_table("requests") as batch:
        batch.create_foreign_key(FK, "request_templates", ["template_id"], ["id"])
