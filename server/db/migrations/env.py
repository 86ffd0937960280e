"""Alembic's entry point: runs the revisions on the connection server/db/migrate.py hands over, inside
the transaction that connection is already in."""

from alembic import context

import server.experiments.store  # noqa: F401  every store's tables on Base, for `--autogenerate`
import server.registry.catalogue  # noqa: F401
import server.registry.namespace  # noqa: F401
import server.tenancy.audit  # noqa: F401
import server.tenancy.keys  # noqa: F401
from server.db.database import Base

# Transactional DDL on both: PostgreSQL's is, and on SQLite server/db/sqlite.py emits the BEGIN itself.
context.configure(connection=context.config.attributes["connection"], target_metadata=Base.metadata,
                  transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
