"""model_limits and model_escalations: limits and SLA escalations changed while the engine
runs (``fusillade-celery limits set``), without restarting a worker or beat

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 08:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_limits",
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("max_in_flight", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("model", name="pk_model_limits"),
    )
    op.create_table(
        "model_escalations",
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("escalation_model", sa.String(256), nullable=True),
        sa.Column("threshold_s", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("model", name="pk_model_escalations"),
    )


def downgrade() -> None:
    op.drop_table("model_escalations")
    op.drop_table("model_limits")
