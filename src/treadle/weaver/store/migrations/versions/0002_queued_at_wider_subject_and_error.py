"""queued_at, wider subject and error

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.alter_column(
            "subject_id",
            existing_type=sa.VARCHAR(length=40),
            type_=sa.String(length=128),
            existing_nullable=False,
        )

    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("queued_at", sa.Float(), nullable=True))
        batch_op.alter_column(
            "error",
            existing_type=sa.VARCHAR(length=128),
            type_=sa.String(length=255),
            existing_nullable=True,
        )
    op.execute("UPDATE executions SET queued_at = created_at WHERE queued_at IS NULL")


def downgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.alter_column(
            "error",
            existing_type=sa.String(length=255),
            type_=sa.VARCHAR(length=128),
            existing_nullable=True,
        )
        batch_op.drop_column("queued_at")

    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.alter_column(
            "subject_id",
            existing_type=sa.String(length=128),
            type_=sa.VARCHAR(length=40),
            existing_nullable=False,
        )
