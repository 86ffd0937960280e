"""The one database of a deployment: its SQLAlchemy engine, the metadata every table is declared on, the
schema's migrations, and the single way to write.

Invariants:
- One `Base` for every table; the schema is what migrations/ makes it. Opening a database upgrades it
  to the newest revision (a catalogue made by loraserve 0.1.0 included); nothing calls `create_all`.
- Every write is one transaction through `Database.write`. SQLite takes one writer at a time: this
  process's writes wait for one lock per database, and other processes' for the file's write lock
  (server/db/sqlite.py). PostgreSQL needs neither; the same code runs on it unchanged.
- A unique constraint refusing a write means a concurrent writer committed the same key first: `write`
  runs the work again, and this time the work sees that row (and answers for it, e.g. a name conflict).
- In-memory copies (`read_cache`) are dropped once a write of this process to one of their tables has
  committed, and expire after a second for the writes of other processes sharing the database.
- A database that cannot be reached fails a write with `DatabaseUnavailableError` (503), and the
  read caches answer from what they last read (a replica cut off from PostgreSQL keeps serving).
- The event loop never waits on a write: every database write from an async route goes through
  `await asyncio.to_thread(...)`. Reads answered from memory may stay on the loop.
"""

import contextlib
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import DeclarativeBase, ORMExecuteState, Session, sessionmaker

from server.db import migrate, sqlite
from server.errors import DatabaseUnavailableError
from server.read_cache import ReadCache

STATE_DIR = ".loraserve"  # under adapters_dir: the catalogue and the blob store (never an adapter)
CATALOGUE_FILE = "catalogue.db"
_WRITE_ATTEMPTS = 5
_TOUCHED = "loraserve.touched_tables"  # Session.info key: names of the tables a write changed
UNREACHABLE = (OperationalError, PoolTimeoutError)  # what a lost connection raises
_CONNECT_TIMEOUT_S = 3  # a server that does not answer: fail the write, do not hang the request

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")


class Base(DeclarativeBase):
    """Every table's declarative base: `Base.metadata` is the schema the migrations must produce."""


class Database:
    """Thread-safe. Read with `with db.read() as session`; write with `db.write(work)`."""

    def __init__(self, url: str):
        """Connect and upgrade the schema to the newest revision. `url`: a SQLite file or a database
        server (an in-memory SQLite database would be a different one on every thread)."""
        is_postgres = url.startswith("postgresql")
        # pre-ping: a connection pooled before a server restart is replaced, not handed out broken.
        self.engine = create_engine(url, pool_pre_ping=True,
                                    connect_args={"connect_timeout": _CONNECT_TIMEOUT_S} if is_postgres else {})
        is_sqlite = self.engine.dialect.name == "sqlite"
        if is_sqlite:
            sqlite.configure(self.engine)
        writer = self.engine.execution_options(**{sqlite.WRITE_OPTION: True})
        migrate.upgrade(writer)
        self._reads = sessionmaker(self.engine, expire_on_commit=False)
        self._writes = sessionmaker(writer, expire_on_commit=False)
        event.listen(self._writes, "after_flush", _note_flushed)
        event.listen(self._writes, "do_orm_execute", _note_executed)
        self._write_lock: contextlib.AbstractContextManager = (
            threading.Lock() if is_sqlite else contextlib.nullcontext())
        self._caches: list[tuple[frozenset[str], ReadCache]] = []

    def read(self) -> Session:
        """A session for reading (use it as a context manager); it must not write."""
        return self._reads()

    def write(self, work: Callable[[Session], T]) -> T:
        """Run `work(session)` in one write transaction and commit; its result is returned. Run again
        when a unique constraint refused it (a concurrent writer's row is then visible to it)."""
        attempts = 0
        while True:
            attempts += 1
            touched: set[str] = set()
            try:
                with self._write_lock, self._writes.begin() as session:
                    session.info[_TOUCHED] = touched
                    return work(session)
            except IntegrityError:
                if attempts == _WRITE_ATTEMPTS:
                    raise
            except UNREACHABLE as exc:
                raise DatabaseUnavailableError(
                    f"the catalogue database cannot be reached ({type(exc.orig or exc).__name__}); "
                    "changes are refused until it is back") from exc
            finally:
                self._drop_copies(touched)

    def read_cache(self, tables: Iterable[str], max_entries: int = 4096) -> ReadCache[K, V]:
        """An in-memory copy of answers read from `tables`, dropped after each write of this process
        that changes one of them."""
        cache: ReadCache[K, V] = ReadCache(max_entries=max_entries, stale_on=UNREACHABLE)
        self._caches.append((frozenset(tables), cache))
        return cache

    def ping(self) -> bool:
        """Whether the database answers now (`/ready`)."""
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except UNREACHABLE:
            return False

    def close(self) -> None:
        self.engine.dispose()

    def _drop_copies(self, touched: set[str]) -> None:
        for tables, cache in self._caches:
            if tables & touched:
                cache.invalidate()


def open_database(adapters_dir: Path, catalogue_url: str | None = None) -> Database:
    """The catalogue of an adapters directory: `catalogue_url` (any SQLAlchemy URL), else SQLite in
    `adapters_dir/.loraserve/catalogue.db` (the directory is made if needed)."""
    if catalogue_url is None:
        state = Path(adapters_dir).resolve() / STATE_DIR
        state.mkdir(parents=True, exist_ok=True)
        catalogue_url = f"sqlite:///{state / CATALOGUE_FILE}"
    return Database(catalogue_url)


def _note_flushed(session: Session, _context) -> None:
    """Record the tables of the rows a flush wrote (the ORM's unit of work)."""
    touched = session.info.get(_TOUCHED)
    if touched is not None:
        for row in (*session.new, *session.dirty, *session.deleted):
            touched.add(row.__table__.name)


def _note_executed(state: ORMExecuteState) -> None:
    """Record the table of an INSERT, UPDATE or DELETE statement run through the session."""
    touched = state.session.info.get(_TOUCHED)
    if touched is not None and (state.is_insert or state.is_update or state.is_delete):
        touched.add(state.statement.table.name)
