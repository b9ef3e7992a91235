"""what a tenant may use (the process tier), and output kept per execution up to a cap

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("allow_process_tier", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("output_bytes", sa.BigInteger(), nullable=True))
        batch_op.add_column(
            sa.Column("output_truncated", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_column("output_truncated")
        batch_op.drop_column("output_bytes")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("allow_process_tier")
