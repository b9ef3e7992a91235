"""sandboxes: long-lived workloads, their desired and observed status

Revision ID: 0005
Revises: 0004
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
        "sandboxes",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("desired", sa.String(16), nullable=False),
        sa.Column("incarnation", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(40), nullable=True),
        sa.Column("isolation", sa.String(16), nullable=True),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("pending_reason", sa.Text(), nullable=True),
        sa.Column("end_reason", sa.Text(), nullable=True),
        sa.Column("restarts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_sandboxes_tenant_id", "sandboxes", ["tenant_id", "id"])
    op.create_index("ix_sandboxes_status", "sandboxes", ["status", "node_id"])


def downgrade() -> None:
    op.drop_index("ix_sandboxes_status", table_name="sandboxes")
    op.drop_index("ix_sandboxes_tenant_id", table_name="sandboxes")
    op.drop_table("sandboxes")
