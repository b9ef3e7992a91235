"""what placement weighs about a node: country, spot, speed, reliability, taints, network

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("country", sa.String(length=2), nullable=True))
        batch_op.add_column(sa.Column("spot", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("spot_price_per_hour", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("perf_score", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("reliability", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("taints", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("network_tiers", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        for name in (
            "network_tiers",
            "taints",
            "reliability",
            "perf_score",
            "spot_price_per_hour",
            "spot",
            "country",
        ):
            batch_op.drop_column(name)
