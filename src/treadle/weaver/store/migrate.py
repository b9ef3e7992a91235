"""Bring a database to the newest schema with Alembic (never with create_all)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from treadle.weaver.store.database import sync_url

__all__ = ["upgrade"]


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", "treadle.weaver.store:migrations")
    return config


# Replicas starting together on one PostgreSQL database take turns: the first migrates, the
# others then find the schema current. The lock ends with the transaction.
_MIGRATION_LOCK = 0x7472_6561_646C_6530


def upgrade(url: str) -> None:
    config = alembic_config()
    engine = create_engine(sync_url(url))
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK}
                )
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        engine.dispose()
