"""sandboxes: an access token for their ports, and what keeps them awake

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        batch.add_column(sa.Column("access_token", sa.String(64), nullable=True))
        batch.add_column(sa.Column("idle_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("awake", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        batch.drop_column("awake")
        batch.drop_column("idle_at")
        batch.drop_column("access_token")
