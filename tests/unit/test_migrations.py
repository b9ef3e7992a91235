"""The schema is built by migrations, and each one upgrades existing data."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from sqlalchemy import Connection, Engine, create_engine, inspect, text

from treadle.weaver.store.database import sync_url
from treadle.weaver.store.migrate import alembic_config, upgrade
from treadle.weaver.store.tables import ACTIVE_STATE_VALUES


def insert_executions(
    conn: Connection, rows: list[tuple[str, str]], created_at: float = 1.0, false: str = "false"
) -> None:
    """A tenant and executions (id, state) of it, with the columns of the first schema."""
    conn.execute(text("INSERT INTO tenants VALUES ('tn_1', 'acme', 1.0)"))
    values = ", ".join(
        f"('{id}', 'tn_1', 'f', 1, '{state}', 1, 3, '{{}}', '{{}}', {false}, {created_at})"
        for id, state in rows
    )
    conn.execute(
        text(
            "INSERT INTO executions (id, tenant_id, function, version, state, attempt, "
            f"max_attempts, resources, args, cancel_requested, created_at) VALUES {values}"
        )
    )


def test_upgrade_from_the_first_schema_backfills_and_downgrade_works(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "0001")
    engine = create_engine(url)
    with engine.begin() as conn:
        insert_executions(conn, [("ex_1", "open")], created_at=123.5, false="0")
    upgrade(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT queued_at FROM executions")).scalar_one() == 123.5
        # A result is kept as the text written, not as the number SQLite would make of it.
        conn.execute(text("UPDATE executions SET result = '1.0'"))
        assert conn.execute(text("SELECT typeof(result) FROM executions")).scalar_one() == "text"
    command.downgrade(config, "base")
    assert inspect(engine).get_table_names() == ["alembic_version"]
    engine.dispose()


def _state_index(engine: Engine) -> dict[str, Any]:
    found = [i for i in inspect(engine).get_indexes("executions") if i["name"] == _STATE_INDEX]
    assert len(found) == 1
    return dict(found[0])


_STATE_INDEX = "ix_executions_state"


def test_on_postgresql_the_state_index_holds_the_active_executions_alone(
    database_url: Callable[..., str],
) -> None:
    url = database_url("postgresql")
    upgrade(url)
    engine = create_engine(sync_url(url))
    try:
        where = _state_index(engine)["dialect_options"]["postgresql_where"]
        # The migration's states are the domain's: a change of those needs a migration.
        assert sorted(re.findall(r"'(\w+)'", where)) == ACTIVE_STATE_VALUES
        with engine.begin() as conn:
            insert_executions(conn, [("ex_1", "open"), ("ex_2", "success")])
            # The claim of open work still reads the index, and finds the open one alone.
            conn.execute(text("SET LOCAL enable_seqscan = off"))
            claim = "SELECT id FROM executions WHERE state = 'open' AND node_id IS NULL"
            plan = "\n".join(conn.execute(text(f"EXPLAIN {claim}")).scalars())
            assert _STATE_INDEX in plan
            assert conn.execute(text(claim)).scalars().all() == ["ex_1"]
        config = alembic_config()
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, "0011")
        assert "postgresql_where" not in _state_index(engine).get("dialect_options", {})
    finally:
        engine.dispose()
