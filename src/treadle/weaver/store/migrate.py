"""Bring a database to the newest schema with Alembic (never with create_all)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine

from treadle.weaver.store.database import sync_url

__all__ = ["upgrade"]


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", "treadle.weaver.store:migrations")
    return config


def upgrade(url: str) -> None:
    config = alembic_config()
    engine = create_engine(sync_url(url))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        engine.dispose()
