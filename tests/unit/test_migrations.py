"""The schema is built by migrations, and each one upgrades existing data."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import create_engine, inspect, text

from treadle.weaver.store.migrate import alembic_config, upgrade


def test_upgrade_from_the_first_schema_backfills_and_downgrade_works(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "0001")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants VALUES ('tn_1', 'acme', 1.0)"))
        conn.execute(
            text(
                "INSERT INTO executions (id, tenant_id, function, version, state, attempt, "
                "max_attempts, resources, args, cancel_requested, created_at) VALUES "
                "('ex_1', 'tn_1', 'f', 1, 'open', 1, 3, '{}', '{}', 0, 123.5)"
            )
        )
    upgrade(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT queued_at FROM executions")).scalar_one() == 123.5
        # A result is kept as the text written, not as the number SQLite would make of it.
        conn.execute(text("UPDATE executions SET result = '1.0'"))
        assert conn.execute(text("SELECT typeof(result) FROM executions")).scalar_one() == "text"
    command.downgrade(config, "base")
    assert inspect(engine).get_table_names() == ["alembic_version"]
    engine.dispose()
