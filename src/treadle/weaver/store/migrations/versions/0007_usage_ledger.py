"""the usage ledger: one row per usage record a node sent, priced when stored

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_records",
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("workload_id", sa.String(40), primary_key=True),
        sa.Column("generation", sa.Integer(), primary_key=True),
        sa.Column("seq", sa.Integer(), primary_key=True),
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("node_id", sa.String(40), nullable=False),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("start", sa.Float(), nullable=False),
        sa.Column("end", sa.Float(), nullable=False),
        sa.Column("final", sa.Boolean(), nullable=False),
        sa.Column("wall_s", sa.Float(), nullable=False),
        sa.Column("paused_s", sa.Float(), nullable=False),
        sa.Column("cpu_s", sa.Float(), nullable=False),
        sa.Column("memory_peak_mib", sa.Float(), nullable=False),
        sa.Column("memory_gib_s", sa.Float(), nullable=False),
        sa.Column("disk_read_bytes", sa.BigInteger(), nullable=False),
        sa.Column("disk_write_bytes", sa.BigInteger(), nullable=False),
        sa.Column("net_in_bytes", sa.BigInteger(), nullable=False),
        sa.Column("net_out_bytes", sa.BigInteger(), nullable=False),
        sa.Column("gpu_s", sa.Float(), nullable=False),
        sa.Column("gpu_memory_peak_mib", sa.Float(), nullable=False),
        sa.Column("price_per_hour", sa.Float(), nullable=False),
        sa.Column("share", sa.Float(), nullable=False),
        sa.Column("cost", sa.Float(), nullable=False),
        sa.Column("recorded_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_usage_records_tenant", "usage_records", ["tenant_id", "end"])


def downgrade() -> None:
    op.drop_index("ix_usage_records_tenant", table_name="usage_records")
    op.drop_table("usage_records")
