"""response_steps: the model and tool calls of the /v1/responses loop, so a retried or
reclaimed request resumes its chain instead of repeating it

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
# Written on a branch whose head was 0004; re-chained onto the head it is merged after.
down_revision = "0005"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "response_steps",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("request_id", sa.BigInteger(), nullable=False),
        sa.Column("parent_id", sa.BigInteger(), nullable=True),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(256), nullable=True),
        sa.Column("call_id", sa.String(256), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="1", nullable=False),
        sa.Column("request", sa.Text(), nullable=True),
        sa.Column("response", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("completed_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_response_steps"),
    )
    op.create_index(
        "ix_response_steps_request", "response_steps", ["request_id", "parent_id", "seq"]
    )


def downgrade() -> None:
    op.drop_index("ix_response_steps_request", table_name="response_steps")
    op.drop_table("response_steps")
