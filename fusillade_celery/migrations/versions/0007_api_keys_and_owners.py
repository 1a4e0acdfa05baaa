"""api_keys (hashes of the HTTP API's keys); files remember their lines' endpoint, models and
count (a batch is made from an uploaded file later); a key's files and batches are listed by
owner, newest first

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
# Written on a branch whose head was 0004; re-chained onto the head it is merged after.
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("endpoint", sa.String(128), nullable=True))
        batch.add_column(sa.Column("models", sa.Text(), nullable=True))
        batch.add_column(sa.Column("request_count", sa.Integer(), nullable=True))
    op.create_index("ix_files_owner_created", "files", ["owner", "created_at"])
    op.create_index("ix_batches_owner_created", "batches", ["owner", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_batches_owner_created", table_name="batches")
    op.drop_index("ix_files_owner_created", table_name="files")
    with op.batch_alter_table("files") as batch:
        batch.drop_column("request_count")
        batch.drop_column("models")
        batch.drop_column("endpoint")
    op.drop_table("api_keys")
