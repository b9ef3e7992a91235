"""On PostgreSQL, the executions index by state holds active executions alone

Revision ID: 0012
Revises: 0011

Each change of an execution's state writes a new version of its row, and on PostgreSQL new
entries in the table's indexes. The index on (state, node_id) holds long runs of one key
(every ended execution of a node), and keeping it made one update of an execution cost 70 to
250 µs of the server's time, measured, against 15 to 19 µs with the index holding only
executions that are open or running: the rows every query that reads it asks for (placement,
a node's work, the reconciler's sweep). SQLite updates its index in place and keeps it whole.

The index is built anew under another name, then takes the old one's place; building it reads
the table once and holds off writes to it meanwhile.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

# The active states as this revision knows them (treadle.domain.execution.ACTIVE_STATES);
# a later change of those needs a migration of its own.
_ACTIVE = ("open", "running")


def _rebuild(where: sa.TextClause | None) -> None:
    op.create_index(
        "ix_executions_state_next",
        "executions",
        ["state", "node_id"],
        postgresql_where=where,
    )
    op.drop_index("ix_executions_state", table_name="executions")
    op.execute("ALTER INDEX ix_executions_state_next RENAME TO ix_executions_state")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    states = ", ".join(f"'{state}'" for state in _ACTIVE)
    _rebuild(sa.text(f"state IN ({states})"))


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    _rebuild(None)
