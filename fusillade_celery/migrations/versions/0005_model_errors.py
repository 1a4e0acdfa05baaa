"""model_errors: the last upstream failure per model, for ``status`` and ``top``

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_errors",
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("message", sa.String(512), nullable=False),
        sa.Column("host", sa.String(512), nullable=True),
        sa.Column("last_at", sa.Float(), nullable=False),
        sa.Column("error_count", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("model", name="pk_model_errors"),
    )


def downgrade() -> None:
    op.drop_table("model_errors")
