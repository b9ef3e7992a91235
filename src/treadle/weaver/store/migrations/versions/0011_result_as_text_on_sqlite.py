"""executions.result declared TEXT on SQLite, so a bare number is kept as written

Revision ID: 0011
Revises: 0010

A column declared JSON has numeric affinity on SQLite: the result `1.0` was stored as the
integer 1 and `2**70` as a float. Results stored before this keep what SQLite made of them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("executions") as batch:
        batch.alter_column("result", existing_type=sa.JSON(), type_=sa.Text())


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("executions") as batch:
        batch.alter_column("result", existing_type=sa.Text(), type_=sa.JSON())
