"""The database module: one engine, one metadata, one write discipline, Alembic migrations, and the
clock every store uses. See database.py for the rules."""

from server.db.clock import UtcDateTime, utc_now
from server.db.database import CATALOGUE_FILE, STATE_DIR, Base, Database, open_database

__all__ = ["CATALOGUE_FILE", "STATE_DIR", "Base", "Database", "UtcDateTime", "open_database", "utc_now"]
