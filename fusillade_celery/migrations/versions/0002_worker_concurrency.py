"""workers.concurrency: each worker's -c, read by the claimer to size execute messages

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 13:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("workers", sa.Column("concurrency", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:  # SQLite has no DROP COLUMN before 3.35
        batch.drop_column("concurrency")
