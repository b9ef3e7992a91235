"""export_cursors: how far each export of the usage ledger got

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "export_cursors",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("recorded_at", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("workload_id", sa.String(40), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_index(
        "ix_usage_records_export",
        "usage_records",
        ["recorded_at", "kind", "workload_id", "generation", "seq"],
    )


def downgrade() -> None:
    op.drop_index("ix_usage_records_export", table_name="usage_records")
    op.drop_table("export_cursors")
