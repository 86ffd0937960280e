"""Bringing a database to the newest schema with Alembic, programmatically (no alembic.ini).

The revisions ship inside the package (server/db/migrations/versions/) and run in one transaction: on
SQLite with the write lock held (BEGIN IMMEDIATE), on PostgreSQL under an advisory lock, so replicas
that start together migrate one after the other and the later ones find nothing left to do.
"""

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, text

SCRIPTS = "server.db:migrations"
_POSTGRES_LOCK = 0x6C6F7261  # any constant all replicas agree on ("lora")


def alembic_config(connection: Connection) -> Config:
    """An Alembic configuration that runs the package's migrations on `connection`."""
    config = Config()
    config.set_main_option("script_location", SCRIPTS)
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database of `engine` (whose connections begin write transactions) to `revision`."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _POSTGRES_LOCK})
        command.upgrade(alembic_config(connection), revision)
