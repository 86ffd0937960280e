"""SQLite's side of the write discipline, set on every connection as it opens.

- WAL: readers never block the writer, nor the writer the readers.
- busy_timeout: a writer of another process (the `keys` CLI beside a server) is waited for, not failed.
- Our own BEGIN: the sqlite3 driver would begin a transaction only at the first INSERT/UPDATE, so a
  write transaction that reads first (the next version number, a name's owner) could find, at its first
  write, that another process wrote since its read, and fail at once whatever the timeout. A write
  transaction therefore begins with BEGIN IMMEDIATE (it takes the write lock before it reads, waiting for
  it up to busy_timeout); a read begins with a plain BEGIN. DDL runs inside the transaction too, so a
  migration applies whole or not at all.
"""

from sqlalchemy import Engine, event

BUSY_TIMEOUT_MS = 30_000
WRITE_OPTION = "loraserve_write"  # execution option of the connections that write


def configure(engine: Engine) -> None:
    """Install the pragmas and the BEGIN discipline on a SQLite engine."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # the driver emits no BEGIN of its own
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        writes = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")
